"""docs/science.md's generator: its statistics against direct computations, its cells from run files."""
import json

from fastvae import science_table


def test_stationary_over_training_is_the_direct_deviation():
    history = {"step": [10, 20], "var_mu": [[0.5, 0.0], [0.9, 0.02]], "mean_sigma2": [[0.1, 1.0], [0.05, 0.99]]}
    track = science_table.stationary_over_training(history)
    assert track[0][0] == 10 and abs(track[0][1] - 0.4) < 1e-12 and abs(track[0][2] - 0.2) < 1e-12
    assert abs(track[1][1] - 0.05) < 1e-12 and abs(track[1][2] - (0.05 + 0.01) / 2) < 1e-12


def test_build_reads_run_files_and_marks_missing_ones(tmp_path):
    (tmp_path / "dense" / "analysis").mkdir(parents=True)
    (tmp_path / "dense" / "analysis" / "latents.json").write_text(json.dumps(
        {"num_inactive": 7, "latent_dim": 16, "max_deviation": 0.125}))
    (tmp_path / "dense" / "metrics.jsonl").write_text(
        json.dumps({"split": "test", "mse": 0.5}) + "\n" + json.dumps({"split": "test", "mse": 0.0142}) + "\n")
    (tmp_path / "conv").mkdir()
    (tmp_path / "conv" / "fid.json").write_text(json.dumps({"settings": {"first-stage": {"fid": 12.5, "n": 10}}}))
    text = science_table.build(tmp_path)
    assert "| 7 of 16 (largest \\|Var+E-1\\| 0.125) |" in text
    assert "| balanced (default) | 0.0142 |" in text
    assert "| first-stage | not run | not run | 12.5 |" in text
    assert "not run" in text.split("## Noise injection")[1]
    assert all(line.count("RUNS") for line in science_table.COMMANDS if "RUNS/" in line)


def test_spread_only_when_the_active_stage_covers_every_variable(tmp_path):
    (tmp_path / "two_stage_active").mkdir()
    (tmp_path / "analysis").mkdir()
    (tmp_path / "analysis" / "latents.json").write_text(json.dumps({"latent_dim": 2}))
    rows = {"second-stage": {"fid": 10.0}, "active second-stage": {"fid": 12.5},
            "second-stage + scalar": {"fid": 8.0}, "active second-stage + scalar": {"fid": 7.0}}
    (tmp_path / "two_stage_active" / "latents.json").write_text(json.dumps({"variables": [0, 1]}))
    assert science_table._spread(tmp_path, rows) == 2.5
    (tmp_path / "two_stage_active" / "latents.json").write_text(json.dumps({"variables": [1]}))
    assert science_table._spread(tmp_path, rows) is None


def test_out_copies_the_figures_it_shows(tmp_path):
    runs, docs = tmp_path / "runs", tmp_path / "docs"
    (runs / "dense" / "noise_injection").mkdir(parents=True)
    (runs / "dense" / "noise_injection" / "noise_injection.png").write_bytes(b"png")
    docs.mkdir()
    assert science_table.main(["--runs", str(runs), "--out", str(docs / "science.md")]) == 0
    assert (docs / "science" / "noise_injection.png").read_bytes() == b"png"
    text = (docs / "science.md").read_text()
    assert "](science/noise_injection.png)" in text and "latent_3d-sampling.png" not in text
