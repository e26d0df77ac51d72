from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent


def requirements(name, floor=False):
    """The pins of requirements/<name>. With `floor`, `==` becomes `>=`: the pins make the test and
    demo virtualenvs reproducible, while an installed package only needs versions at least as new
    (the code runs on torch 2.11+, triton 3.6+, transformers 5.17+), so that extras such as
    `vllm`, which pins transformers itself, can resolve next to it."""
    lines = (here / "requirements" / name).read_text().splitlines()
    reqs = [l.split("#")[0].strip() for l in lines if l.strip() and not l.startswith(("#", "-r"))]
    return [r.replace("==", ">=") for r in reqs] if floor else reqs


def config_packages():
    root = here / "configs"
    subdirs = sorted(str(p.relative_to(root)).replace("/", ".") for p in root.rglob("*") if p.is_dir())
    return ["atlas_fast.configs"] + [f"atlas_fast.configs.{d}" for d in subdirs if "__pycache__" not in d]


CONFIG_PACKAGES = config_packages()
# Lowest versions the code is known to run on (the GPU image's), where they are older than the pins.
OLDEST = {"torch": "2.11.0", "triton": "3.6.0", "transformers": "5.17.0"}
FLOORS = [f"{r.split('>=')[0]}>={OLDEST.get(r.split('>=')[0], r.split('>=')[-1])}"
          for r in requirements("base.txt", floor=True)]


setup(
    name="atlas-fast",
    version="0.1.0",
    description="A lean GRPO trainer with fused Triton kernels",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # `kernels/` installs as `atlas_kernels`: a top-level `kernels` module would shadow
    # Hugging Face's `kernels` distribution, which transformers probes on import.
    # The Hydra configs ship inside the package (atlas_fast.configs) so a non-editable install finds
    # them too. Every folder that holds files is declared as a package, so setuptools neither warns
    # about data folders nor drops them.
    packages=find_packages(include=["atlas_fast", "atlas_fast.*"]) + ["atlas_kernels"] + CONFIG_PACKAGES,
    package_dir={"atlas_kernels": "kernels", "atlas_fast.configs": "configs"},
    package_data={"atlas_fast.demo": ["assets/*", "assets/**/*"], **{p: ["*.yaml"] for p in CONFIG_PACKAGES}},
    include_package_data=False,
    install_requires=FLOORS,
    extras_require={
        "test": requirements("test.txt"),
        "bench": ["pytest-benchmark==5.3.1", "trl==1.16.0", "liger-kernel==0.8.5"],
        # The colocated `vllm` backend and NCCL weight pushes import vLLM in the trainer. vLLM pins
        # its own torch and transformers (0.32: transformers < 5.20); README "vLLM" says where this
        # resolves and why the server is run from a virtualenv of its own instead.
        "vllm": ["vllm>=0.32.0"],
    },
    entry_points={"console_scripts": ["atlas-fast=atlas_fast.cli:main"]},
)
