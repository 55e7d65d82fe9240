"""docs/science.md's generator: its statistics over seeds against direct computations, its record from run files."""
import json
import math
import statistics

import torch

from fastvae import science_table

#: three seeds' fake analyses of the dense row: (inactive, max_deviation, test MSE)
DENSE = {0: (7, 0.5, 0.0142), 1: (9, 0.25, 0.0150), 2: (8, 0.125, 0.0139)}


def _write_train_run(folder, inactive, max_dev, mse, epochs):
    (folder / "analysis").mkdir(parents=True)
    variables = [{"sum": 1.0 + (max_dev if j == 0 else 0.0), "gain": 1e-3 if j >= inactive else 0.0,
                  "var_mu": 0.5, "mean_sigma2": 0.5} for j in range(16)]
    (folder / "analysis" / "latents.json").write_text(json.dumps(
        {"num_inactive": inactive, "latent_dim": 16, "max_deviation": max_dev, "variables": variables}))
    # the tracker's record: one variable at Var + E - 1 = c / sqrt(epoch), one exactly stationary
    c = 0.5 + max_dev
    (folder / "latent_evolution.json").write_text(json.dumps({
        "epoch": list(range(1, epochs + 1)), "step": list(range(1, epochs + 1)),
        "var_mu": [[1.0 + c * e ** -0.5, 0.25] for e in range(1, epochs + 1)],
        "mean_sigma2": [[0.0, 0.75] for _ in range(epochs)]}))
    rows = [{"split": "train", "epoch": e, "mse": 9.0} for e in range(1, epochs + 1)]
    rows += [{"split": "test", "epoch": e, "mse": mse + (epochs - e)} for e in range(1, epochs + 1)]
    (folder / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")


def _fake_runs(tmp_path, epochs=30):
    runs = tmp_path / "runs"
    for seed, (inactive, max_dev, mse) in DENSE.items():
        _write_train_run(runs / "dense" / f"s{seed}", inactive, max_dev, mse, epochs if seed < 2 else epochs - 1)
    for seed, fid in enumerate((40.0, 44.0, 42.0)):
        (runs / "dense" / f"s{seed}" / "fid.json").write_text(json.dumps(
            {"settings": {"first-stage": {"fid": 2 * fid}, "second-stage + per_dim": {"fid": fid}}}))
    return runs


def _write_noise(run, below: bool):
    from fastvae.experiments import NoiseInjectionRow, write_history

    rows = [NoiseInjectionRow(0, "start", 0.0, 1e-3, 20.0, 2.0, 0.5, 0.03, 0.01, 0.1),
            NoiseInjectionRow(1, "noise", 0.5, 1e-5, 1.0 if below else 3.0, 2.0, 0.9, 0.8, 0.01, 0.1),
            NoiseInjectionRow(2, "recovery", 0.0, 1e-3, 10.0, 1.5, 1.2, 0.2, 0.01, 0.1)]
    (run / "noise_injection").mkdir()
    write_history(rows, run / "noise_injection" / "history.csv")
    from fastvae.experiments import save_summary

    save_summary(rows, run / "noise_injection" / "summary.json", variable=3, held=[0, 1])


def test_summary_is_the_mean_and_sample_sd_over_seeds():
    values = [7.0, 9.0, 8.5]
    s = science_table.summarize(values)
    assert s["n"] == 3 and s["values"] == values
    assert math.isclose(s["mean"], statistics.mean(values), rel_tol=1e-15)
    assert math.isclose(s["sd"], statistics.stdev(values), rel_tol=1e-15)
    assert math.isclose(s["sd"], torch.tensor(values, dtype=torch.float64).std(correction=1).item(), rel_tol=1e-12)
    assert science_table.summarize([None, 2.0])["sd"] is None and science_table.summarize([None]) is None
    assert science_table.fmt(s) == "8.17 ± 1 (7, 9, 8.5)"


def test_a_difference_is_called_out_only_beyond_the_seed_spread():
    a, b = science_table.summarize([1.0, 2.0, 3.0]), science_table.summarize([3.5, 4.0, 4.5])  # sd 1 and 0.5
    assert science_table.exceeds_spread(a, b) is True and science_table.exceeds_spread(b, a) is True  # 2 > 1.5
    c = science_table.summarize([3.0, 3.5, 4.0])  # mean 3.5, sd 0.5: |2 - 3.5| = 1.5 is not > 1 + 0.5
    assert science_table.exceeds_spread(a, c) is False and science_table.exceeds_spread(b, c) is False
    assert science_table.exceeds_spread(a, science_table.summarize([5.0])) is None


def test_stationary_over_training_and_its_rate_are_the_direct_ones():
    history = {"epoch": [1, 2], "step": [10, 20], "var_mu": [[0.5, 0.0], [0.9, 0.02]],
               "mean_sigma2": [[0.1, 1.0], [0.05, 0.99]]}
    track = science_table.stationary_over_training(history)
    assert track[0][0] == 1 and abs(track[0][1] - 0.4) < 1e-12 and abs(track[0][2] - 0.2) < 1e-12
    assert abs(track[1][1] - 0.05) < 1e-12 and abs(track[1][2] - (0.05 + 0.01) / 2) < 1e-12
    points = [(e, 3.0 * e ** -0.5) for e in (10, 20, 50, 100)]
    assert math.isclose(science_table.log_slope(points), -0.5, rel_tol=1e-12)


def test_collect_summarizes_complete_seeds_only_and_render_shows_them(tmp_path):
    runs = _fake_runs(tmp_path)
    data = science_table.collect(runs)
    dense = next(row for row in data["rows"] if row["name"] == "dense")
    assert dense["seeds"] == [0, 1] and dense["epochs"] == 30 and dense["images"] == 60000
    assert dense["per_seed"]["2"]["epochs_done"] == 29  # seed 2 stopped one epoch short: kept, not summarized
    inactive = dense["summary"]["inactive"]
    assert inactive["values"] == [7.0, 9.0] and inactive["mean"] == 8.0
    assert math.isclose(inactive["sd"], statistics.stdev([7, 9]))
    assert dense["summary"]["test_mse"]["values"] == [0.0142, 0.0150]
    assert dense["summary"]["used"]["values"] == [9.0, 7.0]
    assert len(dense["per_seed"]["0"]["per_epoch"]) == 30
    assert "--seed {seed} --out RUNS/dense/s{seed}" in dense["command"][0]
    fid = next(row for row in data["rows"] if row["name"] == "fid-dense")
    assert fid["seeds"] == [0, 1] and fid["summary"]["fid.second-stage + per_dim"]["values"] == [40.0, 44.0]
    text = science_table.render(data)
    assert "| 8 ± 1.4 (7, 9) |" in text and "| 30 | 0, 1 (missing: 2; 2 at epoch 29) |" in text
    assert "not run" in text.split("## Noise injection")[1]
    # epoch 10: seeds 0-2 have it; c = 1, 0.75, 0.625 -> max = c / sqrt(10), mean = max / 2
    at10 = [c / math.sqrt(10) for c in (1.0, 0.75, 0.625)]
    assert f"| 10 | 0, 1, 2 | {science_table.fmt(science_table.summarize(at10))} |" in text
    assert "| 30 | 0, 1 |" in text and "| 50 |" not in text
    assert "max ~ epoch^a over epochs 10-30, a = -0.5" in text and "s0: never, s1: never" in text
    assert dense["per_seed"]["1"]["stationary"][3] == [4, 0.75 / 2, 0.75 / 4]


def test_out_writes_the_json_record_and_json_rebuilds_the_same_table(tmp_path):
    runs, docs = _fake_runs(tmp_path), tmp_path / "docs"
    for seed in range(3):
        _write_noise(runs / "dense" / f"s{seed}", below=seed != 1)
    (runs / "dense" / "s0" / "noise_injection" / "noise_injection.png").write_bytes(b"png")
    docs.mkdir()
    assert science_table.main(["--runs", str(runs), "--out", str(docs / "science.md")]) == 0
    assert (docs / "science" / "noise_injection.png").read_bytes() == b"png"
    text = (docs / "science.md").read_text()
    assert "](science/noise_injection.png)" in text and "latent_3d-sampling.png" not in text
    # seed 2's first stage stopped at 29 of 30 epochs: its noise injection is kept in the record, not counted
    assert "The gain fell below the KL in 1 of 2 seeds" in text and "active after the recovery in 2 of 2" in text
    assert (docs / "science" / "noise_injection_seeds.png").stat().st_size > 1000
    assert "| noise stopped | 0.5 ± 0 (0.5, 0.5) | 2 ± 1.4 (1, 3) |" in text
    record = json.loads((docs / "science.json").read_text())
    assert {"model", "epochs", "seeds", "images", "command", "per_seed", "summary"} <= set(record["rows"][1])
    assert science_table.main(["--runs", str(runs), "--json", str(docs / "science.json"),
                               "--out", str(tmp_path / "again.md")]) == 0
    assert (tmp_path / "again.md").read_text() == text


def test_commands_list_every_seed_of_every_row(capsys):
    assert science_table.main(["--commands", "--runs", "R", "--rows", "dense-beta"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "set -e" and len(lines) == 1 + 2 * len(science_table.SEEDS)
    assert all(f"--seed {s} --out R/dense-beta/s{s}" in lines[1 + 2 * s] for s in science_table.SEEDS)


def test_train_tracked_records_every_epoch_and_keeps_them_on_resume(tmp_path):
    run = tmp_path / "run"
    args = ["--dataset", "digits", "--limit", "64", "--batch-size", "32", "--hidden", "8", "--latent", "2",
            "--threads", "1", "--no-progress", "--no-tensorboard", "--images-every", "100"]
    assert science_table.main(["--train-tracked", *args, "--epochs", "1", "--out", str(run)]) == 0
    first = json.loads((run / "latent_evolution.json").read_text())
    assert first["epoch"] == [1] and first["step"] == [2] and len(first["var_mu"][0]) == 2
    assert science_table.main(["--train-tracked", "--resume", str(run), "--epochs", "2", "--threads", "1",
                               "--no-progress", "--no-tensorboard"]) == 0
    both = json.loads((run / "latent_evolution.json").read_text())
    assert both["epoch"] == [1, 2] and both["var_mu"][0] == first["var_mu"][0]


def test_run_records_each_commands_cpu_time_and_goes_on_past_a_failure(tmp_path):
    lines = ["python -c 'sum(range(3_000_000))'", "exit 3", "true"]
    assert science_table.run_commands(lines, tmp_path, log=lambda line: None) == 1
    entries = [json.loads(line) for line in (tmp_path / "cputime.jsonl").read_text().splitlines()]
    assert [e["command"] for e in entries] == lines and [e["rc"] for e in entries] == [0, 3, 0]
    assert entries[0]["user_s"] + entries[0]["sys_s"] > 0 and all(e["wall_s"] >= 0 for e in entries)
    assert science_table._cpu_seconds(tmp_path) == {lines[0]: entries[0]["user_s"] + entries[0]["sys_s"],
                                                    "true": entries[2]["user_s"] + entries[2]["sys_s"]}
