"""Fixtures shared by the C++ program tests: icmoe_aoti is built with CMake once per session.

The build starts in a background thread the first time a test asks for it, so a module can compile its
AOTInductor package at the same time (2 cores, both mostly serial) and only then wait for the program.
"""

from __future__ import annotations

import concurrent.futures as cf

import pytest


@pytest.fixture(scope="session")
def aoti_program_future(tmp_path_factory):
    """A future of the path of icmoe_aoti (CMake against the torch wheel), started now."""
    from engines.cpp import build_programs, program_path

    folder = tmp_path_factory.mktemp("cpp") / "build"
    pool = cf.ThreadPoolExecutor(1)
    future = pool.submit(lambda: program_path(build_programs(folder, targets=("icmoe_aoti",)), "icmoe_aoti"))
    yield future
    pool.shutdown(wait=True)


@pytest.fixture(scope="session")
def aoti_program(aoti_program_future):
    """The path of icmoe_aoti, once built."""
    return aoti_program_future.result()


@pytest.fixture(scope="session")
def labels_family():
    """The multi-class toy family (tests/icmoe/families/toy/), registered for this session's tests."""
    from icmoe.families import FAMILIES, get_family, register_family

    register_family("toy_labels", "tests.icmoe.families.toy:LABELS_FAMILY")
    yield get_family("toy_labels")
    FAMILIES.pop("toy_labels", None)


@pytest.fixture(scope="session")
def labels_model(labels_family):
    """A random-init multi-class toy (micro: 64x64, labels 0..2), eval mode."""
    import torch

    torch.manual_seed(0)
    return labels_family.build(labels_family.get_config("micro")).eval()


@pytest.fixture(scope="session")
def labels_package(labels_model, tmp_path_factory, aoti_program_future):
    """The toy labels model as an AOTInductor package (fast-compile settings); the session's CMake build of
    icmoe_aoti (started first) runs while Inductor compiles."""
    from export.aoti import package_aoti

    return package_aoti(labels_model, tmp_path_factory.mktemp("labels") / "labels.pt2", fast_compile=True)


@pytest.fixture(scope="session")
def labels_build(labels_family, tmp_path_factory):
    """FP32 build of a random-init multi-class toy (micro, 64x64, labels 0..2; batch 1..4, verified on 8 images)."""
    from export.build import build

    out = tmp_path_factory.mktemp("labels_build") / "toy_labels-micro-fp32"
    return build(random_init=True, model="toy_labels", config="micro", precision="fp32", out=out, batch=(1, 2, 4),
                 backend="onnxruntime", verify_images=8, progress=False)
