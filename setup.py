from setuptools import find_packages, setup

# the suite and its lint (launch/test.sh): pytest with a time limit per test, ruff, and the cross-checks' libraries
TEST = ["pytest>=8", "pytest-timeout>=2.2", "ruff>=0.6", "transformers>=4.40", "webdataset", "tensorboard", "wandb"]

setup(
    name="vlpretrain",
    version="0.1.0",
    description="Distributed pretraining for DeepSeek-VL-style vision-language models (PyTorch-native 3D parallel)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["vlpretrain", "vlpretrain.*", "data_tools", "data_tools.*"]),
    install_requires=[
        "torch>=2.6",
        "torchvision",  # timm needs it
        "timm>=1.0.9",
        "tokenizers>=0.19",
        "safetensors>=0.4",
        "pyyaml>=6.0",
        "numpy",
        "pillow",
        "matplotlib",  # vlpretrain report, pipeline timelines
        "pyarrow>=14",  # data sources of type parquet (read one row group at a time)
    ],
    extras_require={
        "test": TEST,
        "dev": TEST,
        "logging": ["wandb", "tensorboard"],
        "megatron": ["megatron-core>=0.16"],  # cross-checks our .bin/.idx reader/writer (tests/test_indexed.py)
    },
    entry_points={"console_scripts": ["vlpretrain=vlpretrain.cli:main"]},
)
