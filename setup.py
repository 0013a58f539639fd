from setuptools import find_packages, setup

setup(
    name="livr",
    version="0.1.0",
    description="Fast Latent Implicit Visual Reasoning (LIVR) fine-tuning: segment-aware Triton attention and a two-stage trainer",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["livr_kernels", "livr_kernels.*", "livr_model", "livr_model.*"]),
    # The range CI tests, no wider (README, "Tested versions"; constraints/ pins both ends).
    # torch 2.11 is the benchmark GPU machine's; CI runs the 2.13 CPU wheel. Install torch first:
    # a loose `pip install torch` pulls a multi-GB CUDA build.
    install_requires=[
        "torch>=2.11,<2.14",
        "triton>=3.6,<3.10",
        "transformers>=5.17,<5.25",
        "peft>=0.21,<0.22",
        "accelerate>=1.15,<1.16",
        "einops",
        "numpy",
        "pillow",
        "safetensors",
        "pyyaml",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "pytest-xdist", "pytest-timeout", "datasets", "trl"],
        "blink": ["datasets"],
        "trl": ["trl>=1.0,<1.17"],
    },
    entry_points={
        "console_scripts": [
            "livr-train=livr_model.app.cli:train_main",
            "livr-eval=livr_model.app.cli:eval_main",
            "livr-data=livr_model.app.data_cli:main",
            "livr-study=livr_model.app.study:study_main",
        ]
    },
)
