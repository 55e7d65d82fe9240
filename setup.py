"""fastvae: fused Triton ops and a lean training loop for variational autoencoders.

`kernels/` holds the Triton kernels alone; it is installed as the subpackage `fastvae.kernels`
through `package_dir`, so the library imports it as `fastvae.kernels` and can live without it
(no Triton on the machine) by running every op on its engine (fastvae/ops/engine/).
"""
from setuptools import setup

# the engine's compiled loops (fastvae/ops/engine/loops.py): without numba reparameterize_kl falls back to
# PyTorch ops many times slower than eager, so every install gets it; the ``cpu`` extra stays for old commands
CPU = ["numba>=0.59"]
TEST = ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "scipy>=1.10", "ruff>=0.6"]
TRAIN = ["tqdm>=4.60", "matplotlib>=3.7", "pillow>=9", "scikit-learn>=1.2"]
# the clients of examples/ and their tests (versions checked to install beside torch 2.13 without replacing it)
CLIENTS = ["diffusers==0.42.1", "lightning==2.6.6", "pythae==0.1.2"]

setup(
    name="fastvae",
    version="0.1.0",
    description="Fused Triton ops and a lean training loop for variational autoencoders",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["fastvae", "fastvae.ops", "fastvae.reference", "fastvae.cli", "fastvae.train", "fastvae.kernels"],
    package_dir={"fastvae": "fastvae", "fastvae.kernels": "kernels"},
    install_requires=[
        "torch>=2.6",
        "numpy>=1.24",
        *CPU,
        "triton>=3.4; platform_system == 'Linux'",
    ],
    extras_require={
        "cpu": CPU,
        "train": TRAIN,
        "test": TEST + TRAIN + CLIENTS,
        "diffusers": ["diffusers>=0.30"],
        "vision": ["torchvision"],
        "fid": ["scipy>=1.10"],
        "tensorboard": ["tensorboard"],
        "bench": ["pythae==0.1.2"],
    },
    entry_points={"console_scripts": ["fastvae=fastvae.cli:main"]},
)
