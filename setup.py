from setuptools import find_packages, setup

setup(
    name="livr",
    version="0.1.0",
    description="Fast Latent Implicit Visual Reasoning (LIVR) fine-tuning: segment-aware Triton attention and a two-stage trainer",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["livr_kernels", "livr_kernels.*", "livr_model", "livr_model.*"]),
    # torch is deliberately unpinned above its floor: install the build you want first
    # (the README pins the CPU wheel used in development and CI).
    install_requires=[
        "torch>=2.4",
        "triton>=3.2",
        "transformers>=5.0",
        "peft>=0.17",
        "accelerate>=1.0",
        "einops",
        "numpy",
        "pillow",
        "safetensors",
        "pyyaml",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "pytest-xdist", "pytest-timeout", "datasets"],
        "blink": ["datasets"],
    },
    entry_points={
        "console_scripts": [
            "livr-train=livr_model.app.cli:train_main",
            "livr-eval=livr_model.app.cli:eval_main",
            "livr-study=livr_model.app.study:study_main",
        ]
    },
)
