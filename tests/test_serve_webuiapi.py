"""A real `diffusion-core serve` on 127.0.0.1, driven by the PyPI `webuiapi` client unchanged: its images equal
the library's direct calls; interrupt, skip, 50 concurrent requests, a client that hangs up and a broken
checkpoint leave it answering the next request correctly. Every wait is bounded; the server is stopped by its
PID, also when a test fails."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import webuiapi
from PIL import Image

from diffusion_core import DiffusionModel
from diffusion_core.serve.a1111_masks import paste_original, prepare_inpainting
from test_serve import PROMPT, assert_same_image, config, make_models_dir, shapes  # noqa: F401  (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
QUEUE_SIZE = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return make_models_dir(tmp_path_factory.mktemp("webuiapi"))


@pytest.fixture(scope="module")
def server(folders, tmp_path_factory):
    """The server in its own process (one thread, as these tests' direct calls), up within 120 s or failed."""
    port, log = free_port(), tmp_path_factory.mktemp("log") / "server.log"
    command = [sys.executable, "-m", "diffusion_core.cli", "serve", "--port", str(port), "--models-dir",
               str(folders["models"]), "--lora-dir", str(folders["loras"]), "--queue-size", str(QUEUE_SIZE)]
    with open(log, "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not _answers(port):
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not answer within 120 s"
            time.sleep(0.3)
        yield port
    finally:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def _answers(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/internal/ping", timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


@pytest.fixture(scope="module")
def api(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server, sampler="Euler a", steps=8)


SMALL = {"prompt": PROMPT, "width": 64, "height": 64, "cfg_scale": 2.0}


def test_txt2img(api, shapes):
    result = api.txt2img(**SMALL, seed=3, batch_size=2)
    assert result.info["all_seeds"] == [3, 4] and result.info["sampler_name"] == "Euler a"
    for image, seed in zip(result.images, (3, 4)):
        assert_same_image(image, shapes.generate(config(seed=seed, sampler="euler_a"), progress=False).image)
    assert result.image.text["parameters"].startswith(f"{PROMPT}\nSteps: 8, Sampler: Euler a, Schedule type: "
                                                      f"Automatic, CFG scale: 2.0, Seed: 3, Size: 64x64, ")


def test_img2img_and_inpainting(api, shapes):
    init = shapes.generate(config(prompt="a yellow triangle on a black background", seed=5), progress=False).image
    result = api.img2img(images=[init], **SMALL, seed=7, denoising_strength=0.6)
    direct = shapes.image_to_image(config(seed=7, sampler="euler_a"), init, 0.6, progress=False)
    assert_same_image(result.image, direct.image)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (8, 8, 40, 56))
    result = api.img2img(images=[init], mask_image=mask, inpaint_full_res=False, **SMALL, seed=7,
                         denoising_strength=0.9)  # webuiapi's mask_blur 4 and inpainting_fill 0 ("fill")
    prepared = prepare_inpainting(init, mask, 4, 4, 0, 0)
    direct = shapes.inpaint(config(seed=7, sampler="euler_a"), prepared.image, prepared.mask, 0.9, progress=False)
    assert_same_image(result.image, paste_original(direct.image, prepared.original, prepared.mask))


def test_samplers_models_and_setting_the_model(api, shapes, folders):
    assert api.util_get_sampler_names() == sorted(["Euler a", "Euler", "DDIM", "PLMS", "DPM++ 2M", "UniPC", "DDPM"])
    assert api.util_get_scheduler_names() == ["automatic", "karras"]
    names = api.util_get_model_names()
    assert [name.split(" [")[0] for name in names] == ["shapes.safetensors", "tinted/tinted.safetensors",
                                                       "zz_broken.safetensors", "zz_evil.ckpt"]
    api.util_set_model("tinted/tinted.safetensors")
    assert api.util_get_current_model() == names[1]
    tinted = DiffusionModel.from_pretrained(folders["models"] / "tinted" / "tinted.safetensors")
    result = api.txt2img(**SMALL, seed=3, sampler_name="DPM++ 2M", scheduler="Karras")
    assert_same_image(result.image, tinted.generate(config(seed=3, sampler="dpmpp_2m", use_karras_sigmas=True),
                                                    progress=False).image)
    answer = api.set_options({"sd_model_checkpoint": "zz_broken.safetensors"})  # webuiapi returns the error body
    assert "could not be loaded" in answer["detail"]
    api.util_set_model("shapes.safetensors")
    assert api.util_get_current_model() == names[0]
    assert_same_image(api.txt2img(**SMALL, seed=3).image, shapes.generate(config(seed=3, sampler="euler_a"),
                                                                         progress=False).image)


def wait_until_running(api, at_least: int = 3, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while api.get_progress()["state"]["sampling_step"] < at_least:
        assert time.monotonic() < deadline, "the task did not start within the time"
        time.sleep(0.05)


def in_thread(call):
    """Run call() in a thread; the returned function joins it (bounded) and gives its result."""
    box = {}
    thread = threading.Thread(target=lambda: box.update(result=call()), daemon=True)
    thread.start()

    def result(timeout: float = 120):
        thread.join(timeout)
        assert not thread.is_alive(), "the request did not finish in time"
        return box["result"]
    return result


def check_interrupt(api, shapes) -> None:
    """Interrupt a 150-step request once it runs: it answers with the image of the step it stopped at, equal
    to the direct call stopped after the same step."""
    result = in_thread(lambda: api.txt2img(**SMALL, seed=9, steps=150))
    wait_until_running(api)
    api.interrupt()
    result = result()
    recorded = json.loads(result.image.text["diffusion-core"])
    steps = recorded["steps_taken"]
    assert recorded["interrupted"] and result.info["interrupted"] and 3 <= steps < 150
    stopped = shapes.generate(config(seed=9, sampler="euler_a", num_inference_steps=150), progress=False,
                              callback=lambda i, *_: i + 1 >= steps)
    assert_same_image(result.image, stopped.image)


def test_interrupt_returns_the_partial_image(api, shapes):
    check_interrupt(api, shapes)
    ready = in_thread(lambda: api.util_wait_for_ready(check_interval=0.1))
    ready(timeout=30)
    assert api.get_progress()["state"]["job_count"] == 0


def test_skip_stops_the_current_batch_only(api, shapes):
    result = in_thread(lambda: api.txt2img(**SMALL, seed=20, steps=60, n_iter=2))
    wait_until_running(api)
    api.skip()
    result = result()
    assert result.info["all_seeds"] == [20, 21]
    assert json.loads(result.images[0].text["diffusion-core"])["interrupted"]
    full = shapes.generate(config(seed=21, sampler="euler_a", num_inference_steps=60), progress=False)
    assert_same_image(result.images[1], full.image)


def test_fifty_concurrent_requests(server, api, shapes):
    def one(seed: int) -> requests.Response:
        body = {**SMALL, "steps": 4, "seed": 1000 + seed, "sampler_name": "Euler"}  # distinct: no cache hits
        return requests.post(f"http://127.0.0.1:{server}/sdapi/v1/txt2img", json=body, timeout=300)

    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(one, range(50)))
    statuses = [a.status_code for a in answers]
    assert set(statuses) <= {200, 429}, statuses
    accepted = [a for a in answers if a.status_code == 200]
    refused = [a for a in answers if a.status_code == 429]
    assert len(accepted) >= QUEUE_SIZE + 1 and refused, statuses
    assert all(int(a.headers["Retry-After"]) >= 1 and "queue is full" in a.json()["detail"] for a in refused)
    assert all(len(a.json()["images"]) == 1 for a in accepted)
    assert_same_image(api.txt2img(**SMALL, seed=3).image, shapes.generate(config(seed=3, sampler="euler_a"),
                                                                         progress=False).image)


def test_a_client_that_hangs_up_mid_generation(server, api, shapes):
    body = json.dumps({**SMALL, "steps": 150, "seed": 31}).encode()
    with socket.create_connection(("127.0.0.1", server), timeout=10) as connection:
        connection.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_until_running(api)
    deadline = time.monotonic() + 30  # the server notices, and stops the task at its next step
    while api.get_progress()["state"]["job_count"]:
        assert time.monotonic() < deadline, "the abandoned task kept running"
        time.sleep(0.1)
    assert_same_image(api.txt2img(**SMALL, seed=3).image, shapes.generate(config(seed=3, sampler="euler_a"),
                                                                         progress=False).image)
