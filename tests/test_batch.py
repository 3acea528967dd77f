"""`diffusion-core batch`: one PNG per line equal to generate's, resumable without overwriting, every line checked
before anything runs, and the same pixels on Ray Data."""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusion_core import DiffusionModel, GenerationConfig
from diffusion_core.generation import read_png_parameters
from diffusion_core.serve.batch import add_batch_parser, generate_batch_file, run_batch, write_png

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

GOOD = {"prompt": "a red circle on a blue background", "seed": 1, "num_inference_steps": 4}
LINES = [GOOD,
         None,  # a blank line: skipped, but counted
         {"prompt": "a green square", "negative_prompt": "blurry", "seed": 2, "num_inference_steps": 4,
          "sampler": "euler_a", "guidance_scale": 5.0},
         {"prompt": "a blue triangle", "num_inference_steps": 4}]  # no seed: GenerationConfig's 0
NAMES = ["00001-1.png", "00003-2.png", "00004-0.png"]  # {line:05d}-{seed}.png


def write_prompts(path: Path, lines: list) -> Path:
    path.write_text("".join((json.dumps(line) if isinstance(line, dict) else line or "") + "\n" for line in lines))
    return path


def pixels(path_or_image) -> np.ndarray:
    image = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    return np.asarray(image)


def batch_cli(*argv) -> int:
    parser = argparse.ArgumentParser(prog="diffusion-core")
    add_batch_parser(parser.add_subparsers(dest="command", required=True))
    return run_batch(parser.parse_args(["batch", *map(str, argv)]))


@pytest.fixture(scope="module")
def expected():
    """Each line's image as the Python API makes it, one at a time."""
    model = DiffusionModel()
    configs = [GenerationConfig(**line) for line in LINES if line is not None]
    return {name: model.generate(config, progress=False) for name, config in zip(NAMES, configs)}


@pytest.fixture(scope="module")
def local_out(tmp_path_factory) -> tuple[Path, Path, list[Path]]:
    folder = tmp_path_factory.mktemp("local")
    prompts = write_prompts(folder / "prompts.jsonl", LINES)
    return prompts, folder / "out", generate_batch_file(prompts, folder / "out", progress=False)


def test_local_mode_writes_each_line_as_generate_makes_it(local_out, expected):
    _, out, written = local_out
    assert written == [out / name for name in NAMES]
    assert sorted(p.name for p in out.iterdir()) == NAMES  # no temporary file left
    for name, result in expected.items():
        np.testing.assert_array_equal(pixels(out / name), pixels(result.image))
        assert GenerationConfig.from_png(out / name) == result.config  # every default filled in
        assert read_png_parameters(out / name)["mode"] == "text_to_image"


def test_a_resumed_batch_generates_only_the_missing_lines_and_overwrites_nothing(tmp_path, capsys, expected):
    prompts, out = write_prompts(tmp_path / "prompts.jsonl", LINES), tmp_path / "out"
    out.mkdir()
    foreign = out / NAMES[2]
    foreign.write_bytes(b"not this batch's image")  # an existing file counts as done and is left as it is
    assert batch_cli(prompts, "--out", out, "--quiet") == 0
    captured = capsys.readouterr()
    assert "skipped 1 of 3 lines" in captured.err and "2 images written" in captured.out
    before = {name: (out / name).stat() for name in NAMES}
    (out / NAMES[1]).unlink()
    assert batch_cli(prompts, "--out", out, "--quiet") == 0
    captured = capsys.readouterr()
    assert "skipped 2 of 3 lines" in captured.err and "1 images written" in captured.out
    for name in (NAMES[0], NAMES[2]):
        after = (out / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before[name].st_ino, before[name].st_mtime_ns)
    assert foreign.read_bytes() == b"not this batch's image"
    np.testing.assert_array_equal(pixels(out / NAMES[1]), pixels(expected[NAMES[1]].image))
    assert generate_batch_file(prompts, out, progress=False) == []  # all done: nothing loaded or written


def test_write_png_never_replaces_a_file(tmp_path, expected):
    path = tmp_path / "00001-1.png"
    path.write_bytes(b"first")
    with pytest.raises(FileExistsError):
        write_png(expected[NAMES[0]], path)
    assert path.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the temporary file is gone too


@pytest.mark.parametrize("line, says", [
    ('{"prompt": "a red circle", ', "not valid JSON"),
    ('["a red circle"]', "expected a JSON object"),
    ('{"prompt": "a red circle", "steps": 4}', "unknown field 'steps'; GenerationConfig's fields are prompt, "
                                               "negative_prompt, width, height, num_inference_steps"),
    ('{"prompt": "a red circle", "seed": null}', "a batch needs fixed seeds"),
    ('{"negative_prompt": "blurry"}', 'no "prompt"'),
    ('{"prompt": "a red circle", "width": -8}', "width must be a positive integer"),
    ('{"prompt": "a red circle", "sampler": "fast"}', "unknown sampler 'fast'"),
    ('{"prompt": "a red circle", "guidance_scale": "high"}', "'>=' not supported"),
])
def test_a_bad_line_is_named_and_nothing_is_generated(tmp_path, line, says):
    prompts = write_prompts(tmp_path / "prompts.jsonl", [GOOD, None, line, GOOD])
    with pytest.raises(ValueError) as error:
        generate_batch_file(prompts, tmp_path / "out", progress=False)
    assert str(error.value).startswith(f"{prompts}:3: ") and says in str(error.value)
    assert not (tmp_path / "out").exists()


def test_bad_input_outside_the_lines(tmp_path, monkeypatch):
    prompts = write_prompts(tmp_path / "prompts.jsonl", [GOOD])
    with pytest.raises(FileNotFoundError, match="missing.jsonl: no such file"):
        generate_batch_file(tmp_path / "missing.jsonl", tmp_path / "out")
    with pytest.raises(ValueError, match="no prompts"):
        generate_batch_file(write_prompts(tmp_path / "blank.jsonl", [None, " "]), tmp_path / "out")
    with pytest.raises(ValueError, match="--workers and --cpus-per-worker apply to --ray"):
        batch_cli(prompts, "--out", tmp_path / "out", "--workers", 2)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(ImportError, match=r"pip install 'diffusion-core\[ray\]'"):
        generate_batch_file(prompts, tmp_path / "out", ray=True)


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    # a short folder of our own: Ray's Unix socket paths under it must fit 107 bytes, which pytest's deep
    # tmp_path does not leave room for, and /tmp/ray (the default) may hold another user's session
    temp_dir = tempfile.mkdtemp(prefix="ray-")
    try:
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False)
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_mode_with_two_workers_writes_the_same_images(ray_cluster, local_out, tmp_path):
    prompts, local, _ = local_out
    written = generate_batch_file(prompts, tmp_path / "out", ray=True, workers=2, progress=False)
    assert written == [tmp_path / "out" / name for name in NAMES]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == NAMES
    for name in NAMES:
        np.testing.assert_array_equal(pixels(tmp_path / "out" / name), pixels(local / name))
        assert GenerationConfig.from_png(tmp_path / "out" / name) == GenerationConfig.from_png(local / name)


@pytest.mark.parametrize("on_ray", [False, True], ids=["local", "ray"])
def test_a_line_the_model_refuses_is_named_and_the_lines_before_it_stay(request, tmp_path, on_ray):
    if on_ray:
        request.getfixturevalue("ray_cluster")
    sdxl_only = {**GOOD, "seed": 2, "prompt_2": "oil painting"}  # SD 1.x has no second text encoder
    prompts = write_prompts(tmp_path / "prompts.jsonl", [GOOD, sdxl_only])
    with pytest.raises(ValueError, match=rf"^{prompts}:2: \['prompt_2'\] are SDXL-only fields"):
        generate_batch_file(prompts, tmp_path / "out", ray=on_ray, progress=False)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["00001-1.png"]  # resumable once line 2 is fixed
