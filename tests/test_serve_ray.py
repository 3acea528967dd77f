"""The same A1111 app on Ray Serve (`serve --ray --replicas 2`), on this CPU: ray.init(num_cpus=2), one CPU per
generator replica, Serve's HTTP proxy on 127.0.0.1 and Ray's files in a private temporary folder. Its images
equal the library's direct calls; model multiplexing, interrupt and a broken checkpoint behave as on one
machine."""
from __future__ import annotations

import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
import requests
import webuiapi
from ray import serve

from diffusion_core import DiffusionModel
from diffusion_core.serve.ray_serve import build_ray_app
from diffusion_core.serve.security import Limits
from test_serve import PROMPT, assert_same_image, config, make_models_dir, shapes  # noqa: F401  (a fixture)
from test_serve_webuiapi import api, check_interrupt, free_port  # noqa: F401  (api: a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = {"prompt": PROMPT, "width": 64, "height": 64, "cfg_scale": 2.0}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return make_models_dir(tmp_path_factory.mktemp("ray-serve"))


@pytest.fixture(scope="module")
def server(folders):
    temp = tempfile.mkdtemp(prefix="ray-")  # short: Ray's socket paths must fit 107 bytes
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        store = {"models_dir": folders["models"], "lora_dir": folders["loras"]}
        serve.run(build_ray_app(store, Limits(), None, queue_size=2, replicas=2, model_cache=2),
                  name="diffusion-core", route_prefix="/")
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def test_replicas_make_the_librarys_images(api, server, shapes):
    def one(seed: int):
        body = {**SMALL, "steps": 8, "seed": seed, "sampler_name": "Euler a"}
        return requests.post(f"http://127.0.0.1:{server}/sdapi/v1/txt2img", json=body, timeout=300)

    seeds = range(3, 11)
    with ThreadPoolExecutor(len(seeds)) as pool:  # 2 replicas working, 2 requests waiting, the rest refused
        answers = list(pool.map(one, seeds))
    assert {a.status_code for a in answers} == {200, 429}, [a.status_code for a in answers]
    for answer, seed in zip(answers, seeds):
        if answer.status_code == 200:
            image = webuiapi.WebUIApi._to_api_result(None, answer).image
            assert_same_image(image, shapes.generate(config(seed=seed, sampler="euler_a"), progress=False).image)
        else:
            assert "queue is full" in answer.json()["detail"] and int(answer.headers["Retry-After"]) >= 1


def test_multiplexed_models_and_a_broken_one(api, folders, shapes):
    api.util_set_model("tinted/tinted.safetensors")
    tinted = DiffusionModel.from_pretrained(folders["models"] / "tinted" / "tinted.safetensors")
    result = api.txt2img(**SMALL, seed=3, batch_size=2)
    for image, seed in zip(result.images, (3, 4)):
        assert_same_image(image, tinted.generate(config(seed=seed, sampler="euler_a"), progress=False).image)
    assert "could not be loaded" in api.set_options({"sd_model_checkpoint": "zz_broken.safetensors"})["detail"]
    api.util_set_model("shapes.safetensors")
    assert_same_image(api.txt2img(**SMALL, seed=3).image,
                      shapes.generate(config(seed=3, sampler="euler_a"), progress=False).image)


def test_interrupt_on_a_replica(api, shapes):
    check_interrupt(api, shapes)
