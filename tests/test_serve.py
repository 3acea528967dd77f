"""The A1111 server in-process (FastAPI's TestClient): every answer equals the library's direct call, and every
bad input is a 4xx that names what was wrong. tests/test_serve_webuiapi.py drives a real server with webuiapi."""
from __future__ import annotations

import base64
import io
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import load_file, save_file

from diffusion_core import DiffusionModel, GenerationConfig
from diffusion_core.a1111 import infotext, parse_infotext, parse_sampler
from diffusion_core.cli import main
from diffusion_core.serve.a1111_masks import paste_original, prepare_inpainting
from diffusion_core.serve.app import Settings, create_app
from diffusion_core.serve.models import ModelStore
from diffusion_core.serve.security import Limits, check_bind, credentials_match, parse_credentials

pytestmark = pytest.mark.usefixtures("one_thread")
WEIGHTS = Path(__file__).resolve().parents[1] / "diffusion_core" / "toy" / "weights"
PROMPT = "a red circle on a blue background"
SMALL = {"prompt": PROMPT, "width": 64, "height": 64, "steps": 8, "cfg_scale": 2.0, "seed": 11}


def make_models_dir(root: Path) -> dict[str, Path]:
    """A models folder: the shapes model, a tinted copy (other weights, other images), a broken file and a
    .ckpt whose pickle would run code; a LoRA folder and an embeddings folder with the shipped ones."""
    models, loras, embeddings = root / "models", root / "loras", root / "embeddings"
    for folder in (models / "tinted", loras, embeddings):
        folder.mkdir(parents=True)
    shutil.copy(WEIGHTS / "toy_shapes.safetensors", models / "shapes.safetensors")
    shutil.copy(WEIGHTS / "toy_shapes.yaml", models / "shapes.yaml")
    state = load_file(WEIGHTS / "toy_shapes.safetensors")
    state["model.diffusion_model.out.2.bias"] = state["model.diffusion_model.out.2.bias"] + 0.3
    save_file(state, models / "tinted" / "tinted.safetensors")
    shutil.copy(WEIGHTS / "toy_shapes.yaml", models / "tinted" / "tinted.yaml")
    (models / "zz_broken.safetensors").write_bytes(b"not a safetensors file at all")
    (models / "zz_evil.ckpt").write_bytes(pickle.dumps(_RunsCode()))
    shutil.copy(WEIGHTS / "star_lora.safetensors", loras / "star.safetensors")
    shutil.copy(WEIGHTS / "sundisc.safetensors", embeddings / "sundisc.safetensors")
    return {"models": models, "loras": loras, "embeddings": embeddings}


class _RunsCode:
    def __reduce__(self):  # unpickling calls print: torch.load(weights_only=True) must refuse it
        return (print, ("this checkpoint ran code",))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return make_models_dir(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def client(folders):
    store = ModelStore(models_dir=folders["models"], lora_dir=folders["loras"], embeddings_dir=folders["embeddings"])
    with TestClient(create_app(Settings(store, queue_size=4))) as client:
        yield client


@pytest.fixture(scope="module")
def shapes(folders):
    return DiffusionModel.from_pretrained(folders["models"] / "shapes.safetensors")


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def assert_same_image(served: Image.Image, direct: Image.Image) -> None:
    """Every pixel within 1/255 of the direct call's (DESIGN.md's bar for whole images)."""
    assert served.size == direct.size
    assert np.abs(pixels(served) - pixels(direct)).max() <= 1


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def encoded(image: Image.Image, data_url: bool = False) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    text = base64.b64encode(buffer.getvalue()).decode()
    return f"data:image/png;base64,{text}" if data_url else text


def post(client, route: str, body: dict, status: int = 200) -> dict:
    answer = client.post(f"/sdapi/v1/{route}", json=body)
    assert answer.status_code == status, answer.text[:1000]
    return answer.json()


def config(**fields) -> GenerationConfig:
    """The GenerationConfig the server builds for SMALL with `fields` changed: A1111 reads its prompt syntax."""
    values = {"prompt": PROMPT, "width": 64, "height": 64, "num_inference_steps": 8, "guidance_scale": 2.0,
              "seed": 11, "sampler": "euler", "prompt_weighting": True, **fields}
    return GenerationConfig(**values)


# ---- images equal the library's direct calls


@pytest.mark.parametrize("sampler, scheduler, ours, karras", [
    ("Euler a", None, "euler_a", None), ("DPM++ 2M", "Karras", "dpmpp_2m", True), ("DPM++ 2M Karras", None,
    "dpmpp_2m", True), ("DDIM", "automatic", "ddim", None), ("PLMS", None, "pndm", None), ("UniPC", None, "unipc", None)])
def test_txt2img_equals_generate(client, shapes, sampler, scheduler, ours, karras):
    answer = post(client, "txt2img", {**SMALL, "sampler_name": sampler, "scheduler": scheduler,
                                      "negative_prompt": "a green square"})
    direct = shapes.generate(config(sampler=ours, use_karras_sigmas=karras, negative_prompt="a green square"),
                             progress=False)
    assert_same_image(decoded(answer["images"][0]), direct.image)
    info = json.loads(answer["info"])
    assert info["sampler_name"] == sampler.removesuffix(" Karras")
    assert info["scheduler"] == ("Karras" if karras else "Automatic")


def test_a_batch_seeds_image_i_with_seed_plus_i(client, shapes):
    answer = post(client, "txt2img", {**SMALL, "batch_size": 2, "n_iter": 2, "sampler_name": "Euler a"})
    info = json.loads(answer["info"])
    assert info["all_seeds"] == [11, 12, 13, 14] and len(answer["images"]) == 4
    for image, seed in zip(answer["images"], info["all_seeds"]):
        assert_same_image(decoded(image), shapes.generate(config(seed=seed, sampler="euler_a"), progress=False).image)


def test_seed_minus_one_is_drawn_and_recorded(client, shapes):
    answers = [json.loads(post(client, "txt2img", {**SMALL, "seed": -1, "batch_size": 2})["info"]) for _ in range(2)]
    first, second = (info["all_seeds"] for info in answers)
    assert first[1] == first[0] + 1 and first != second and 0 <= first[0] < 2**32


def test_the_png_carries_a1111s_infotext_and_png_info_parses_it(client, shapes):
    answer = post(client, "txt2img", {**SMALL, "sampler_name": "DPM++ 2M", "scheduler": "Karras",
                                      "negative_prompt": "blurry, dark", "override_settings":
                                      {"CLIP_stop_at_last_layers": 2}})
    image = decoded(answer["images"][0])
    sha256 = client.get("/sdapi/v1/options").json()["sd_checkpoint_hash"]
    text = image.text["parameters"]
    prompt, negative, line = text.split("\n")
    assert (prompt, negative) == (PROMPT, "Negative prompt: blurry, dark")
    assert line.startswith("Steps: 8, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 2.0, Seed: 11, "
                           f"Size: 64x64, Model hash: {sha256[:10]}, ")
    assert ", Model: shapes, Clip skip: 2, Version: diffusion-core " in line
    assert json.loads(answer["info"])["infotexts"] == [text]
    parsed = post(client, "png-info", {"image": encoded_with_text(image)})
    assert parsed["info"] == text
    assert parsed["parameters"] == {**parse_infotext(text), "Prompt": PROMPT, "Negative prompt": "blurry, dark"}
    assert parsed["parameters"]["Size-1"] == "64" and parsed["parameters"]["Clip skip"] == "2"
    assert "diffusion-core" in parsed["items"]


def encoded_with_text(image: Image.Image) -> str:
    """A PNG re-encoded with its text chunks, as webuiapi's b64_img does."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key, value in image.text.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode()


def test_clip_skip_override_equals_generate_with_clip_skip(client, shapes):
    answer = post(client, "txt2img", {**SMALL, "override_settings": {"CLIP_stop_at_last_layers": 2}})
    assert_same_image(decoded(answer["images"][0]), shapes.generate(config(clip_skip=1), progress=False).image)


@pytest.fixture(scope="module")
def init_image(shapes):
    return shapes.generate(config(prompt="a yellow triangle on a black background", seed=5), progress=False).image


@pytest.mark.parametrize("data_url", [False, True])
def test_img2img_equals_image_to_image(client, shapes, init_image, data_url):
    answer = post(client, "img2img", {**SMALL, "init_images": [encoded(init_image, data_url)],
                                      "denoising_strength": 0.6})
    direct = shapes.image_to_image(config(), init_image, 0.6, progress=False)
    assert_same_image(decoded(answer["images"][0]), direct.image)
    assert json.loads(answer["info"])["denoising_strength"] == 0.6
    assert answer["parameters"]["init_images"] is None  # A1111 does not echo the images back


@pytest.mark.parametrize("fill, blur, invert", [(0, 4, 0), (1, 0, 0), (1, 8, 1)])
def test_inpainting_equals_inpaint_of_a1111s_mask(client, shapes, init_image, fill, blur, invert):
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 40))
    answer = post(client, "img2img", {**SMALL, "init_images": [encoded(init_image)], "mask": encoded(mask),
                                      "denoising_strength": 0.9, "mask_blur": blur, "inpainting_fill": fill,
                                      "inpainting_mask_invert": invert, "inpaint_full_res": False})
    prepared = prepare_inpainting(init_image, mask, blur, blur, fill, invert)
    direct = shapes.inpaint(config(), prepared.image, prepared.mask, 0.9, progress=False)
    expected = paste_original(direct.image, prepared.original, prepared.mask)  # A1111's overlay
    assert_same_image(decoded(answer["images"][0]), expected)
    assert f"Mask blur: {blur}, Masked content: {['fill', 'original'][fill]}" in json.loads(answer["info"])["infotexts"][0]


def test_a_lora_tag_merges_that_lora_for_the_request_only(client, shapes, folders):
    prompt = "a star on a blue background"
    answer = post(client, "txt2img", {**SMALL, "prompt": f"{prompt} <lora:star:0.8>"})
    report = shapes.load_lora(folders["loras"] / "star.safetensors", 0.8, name="star")
    try:
        direct = shapes.generate(config(prompt=f"{prompt} "), progress=False)
    finally:
        shapes.unload_lora()
    assert_same_image(decoded(answer["images"][0]), direct.image)
    text = json.loads(answer["info"])["infotexts"][0]
    assert text.startswith(f"{prompt}  <lora:star:0.8>\nSteps: 8, ")  # as A1111 users write it
    assert f', Lora hashes: "star: {report.sha256[:12]}", Version: ' in text
    without = post(client, "txt2img", {**SMALL, "prompt": f"{prompt} "})  # the cached model has its weights back
    assert_same_image(decoded(without["images"][0]), shapes.generate(config(prompt=f"{prompt} "), progress=False).image)


def test_embeddings_of_the_folder_are_loaded_and_listed(client, shapes, folders):
    prompt = "a sundisc on a white background"
    answer = post(client, "txt2img", {**SMALL, "prompt": prompt})
    reference = DiffusionModel.from_pretrained(folders["models"] / "shapes.safetensors")
    reference.load_textual_inversion(folders["embeddings"] / "sundisc.safetensors", token="sundisc")
    assert_same_image(decoded(answer["images"][0]), reference.generate(config(prompt=prompt), progress=False).image)
    assert list(client.get("/sdapi/v1/embeddings").json()["loaded"]) == ["sundisc"]


# ---- listings, options, caches, metrics


def test_listings(client):
    samplers = client.get("/sdapi/v1/samplers").json()
    assert [s["name"] for s in samplers] == ["Euler a", "Euler", "DDIM", "PLMS", "DPM++ 2M", "UniPC", "DDPM"]
    schedulers = client.get("/sdapi/v1/schedulers").json()
    assert [(s["name"], s["label"]) for s in schedulers] == [("automatic", "Automatic"), ("karras", "Karras")]
    models = client.get("/sdapi/v1/sd-models").json()
    assert [m["filename"] for m in models] == ["shapes.safetensors", "tinted/tinted.safetensors",
                                               "zz_broken.safetensors", "zz_evil.ckpt"]
    assert all(m["title"] == f"{m['filename']} [{m['sha256'][:10]}]" for m in models)
    assert client.get("/sdapi/v1/loras").json() == [{"name": "star", "alias": "star", "path": "star.safetensors",
                                                     "metadata": {}}]
    assert client.get("/internal/ping").json() == {}


def test_setting_the_model_changes_the_images_and_bad_models_leave_it_serving(client, shapes, folders):
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("shapes.safetensors [")
    tinted = DiffusionModel.from_pretrained(folders["models"] / "tinted" / "tinted.safetensors")
    answer = post(client, "txt2img", {**SMALL, "override_settings": {"sd_model_checkpoint": "tinted/tinted"}})
    assert_same_image(decoded(answer["images"][0]), tinted.generate(config(), progress=False).image)
    post(client, "options", {"sd_model_checkpoint": "tinted/tinted.safetensors"})
    assert_same_image(decoded(post(client, "txt2img", SMALL)["images"][0]), tinted.generate(config(), progress=False).image)
    post(client, "options", {"sd_model_checkpoint": "shapes"})
    for name, status, words in [("../../etc/passwd", 400, "no checkpoint"), (str(folders["models"] / "shapes.yaml"),
                                400, "no checkpoint"), ("zz_broken", 422, "could not be loaded"),
                                ("zz_evil", 422, "weights_only")]:
        detail = post(client, "options", {"sd_model_checkpoint": name}, status)["detail"]
        assert words in detail, detail
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("shapes.safetensors [")
    assert_same_image(decoded(post(client, "txt2img", SMALL)["images"][0]), shapes.generate(config(), progress=False).image)
    assert "CLIP_stop_at_last_layers" in post(client, "options", {"sd_vae": "x"}, 400)["detail"]


def test_the_result_cache_answers_fixed_seeds_only(client):
    def hits() -> float:
        for line in client.get("/metrics").text.splitlines():
            if line.startswith('diffusion_core_cache_hits_total{cache="result"}'):
                return float(line.split()[-1])
        return 0.0

    body = {**SMALL, "seed": 4242}
    first, before = post(client, "txt2img", body), hits()
    again = post(client, "txt2img", body)
    assert again["images"] == first["images"] and hits() == before + 1
    assert post(client, "txt2img", {**body, "send_images": False})["images"] == []  # the answer is this request's
    assert hits() == before + 2
    post(client, "txt2img", {**body, "seed": -1})
    post(client, "txt2img", {**body, "seed": -1})
    assert hits() == before + 2  # a drawn seed is never answered from the cache


def test_metrics_count_requests_by_route(client):
    post(client, "txt2img", SMALL)
    text = client.get("/metrics").text
    assert 'diffusion_core_requests_total{route="/sdapi/v1/txt2img",status="200"}' in text
    assert 'diffusion_core_request_seconds_bucket{le="0.01",route="/sdapi/v1/txt2img"}' in text
    assert "diffusion_core_queue_depth 0.0" in text and "diffusion_core_generation_seconds_count" in text


def test_progress_when_idle_is_what_util_wait_for_ready_waits_for(client):
    progress = client.get("/sdapi/v1/progress").json()
    assert progress["progress"] == 0.0 and progress["state"]["job_count"] == 0


# ---- bad input: a 4xx that names the field, never a 500


BAD = [
    ("txt2img", {**SMALL, "steps": 151}, 422, "steps must be between 1 and 150"),
    ("txt2img", {**SMALL, "steps": 0}, 422, "steps must be between 1 and 150"),
    ("txt2img", {**SMALL, "width": 4096, "height": 4096}, 422, "width × height must be at most 4194304"),
    ("txt2img", {**SMALL, "batch_size": 8, "n_iter": 3}, 422, "batch_size × n_iter must be between 1 and 16"),
    ("txt2img", {**SMALL, "width": 62}, 422, "width and height must be multiples of 4 (the VAE's"),
    ("txt2img", {**SMALL, "steps": "many"}, 422, "steps: Input should be a valid integer"),
    ("txt2img", {**SMALL, "cfg_scale": -1}, 422, "guidance_scale must be >= 0"),
    ("txt2img", {**SMALL, "sampler_name": "Heun"}, 400, "unknown sampler 'Heun'; choose one of ['Euler a', 'Euler'"),
    ("txt2img", {**SMALL, "scheduler": "exponential"}, 400, "unknown schedule type 'exponential'"),
    ("txt2img", {**SMALL, "sampler_name": "Euler a", "scheduler": "Karras"}, 400, "Euler a has no Karras schedule"),
    ("txt2img", {**SMALL, "sampler_name": "DDIM", "eta": 1.0}, 400, "DDIM uses η = 0"),
    ("txt2img", {**SMALL, "enable_hr": True}, 400, "enable_hr=True (the hires fix"),
    ("txt2img", {**SMALL, "script_name": "x/y/z plot"}, 400, "script_name='x/y/z plot' (scripts"),
    ("txt2img", {**SMALL, "alwayson_scripts": {"ControlNet": {"args": []}}}, 400, "alwayson_scripts="),
    ("txt2img", {**SMALL, "save_images": True}, 400, "save_images=True (saving on the server's disk"),
    ("txt2img", {**SMALL, "styles": ["cinematic"]}, 400, "prompt styles"),
    ("txt2img", {**SMALL, "no_such_field": 1}, 422, "no_such_field: Extra inputs are not permitted"),
    ("txt2img", {**SMALL, "override_settings": {"sd_vae": "x"}}, 400,
     "override_settings: ['sd_vae'] are not settings of this server; it has ['sd_model_checkpoint', 'CLIP_stop_"),
    ("options", {"CLIP_stop_at_last_layers": "two"}, 422, "options: CLIP_stop_at_last_layers: Input should be a valid"),
    ("txt2img", {**SMALL, "prompt": "a <lora:nothere:1> circle"}, 400, "no LoRA 'nothere' in the server's LoRA folder; it has ['star']"),
    ("txt2img", {**SMALL, "prompt": "a <hypernet:x:1> circle"}, 400, "<lora:name:weight> only"),
    ("txt2img", {**SMALL, "prompt": "a <lora:star:lots> circle"}, 422, "the weight must be a number"),
    ("img2img", {**SMALL}, 422, "init_images: img2img needs at least one image"),
    ("img2img", {**SMALL, "init_images": ["http://169.254.169.254/latest/meta-data"]}, 400, "never fetched from URLs"),
    ("img2img", {**SMALL, "init_images": ["not base64 !!"]}, 422, "init_images[0]: not valid base64"),
    ("img2img", {**SMALL, "init_images": [base64.b64encode(b"hello, not an image").decode()]}, 422,
     "init_images[0]: not an image"),
    ("img2img", {**SMALL, "init_images": ["data:image/png,abc"]}, 422, "a data URL must be base64"),
    ("img2img", {**SMALL, "init_images": [encoded(Image.new("RGB", (8, 8)))], "denoising_strength": 0}, 422,
     "denoising_strength must lie in (0, 1]"),
    ("img2img", {**SMALL, "init_images": [encoded(Image.new("RGB", (8, 8)))], "mask": encoded(Image.new("L", (8, 8))),
                 "inpaint_full_res": True}, 400, "inpaint_full_res=True"),
    ("img2img", {**SMALL, "init_images": [encoded(Image.new("RGB", (8, 8)))], "mask": encoded(Image.new("L", (8, 8))),
                 "inpaint_full_res": False, "inpainting_fill": 2}, 400, "inpainting_fill 2 (latent noise) is not"),
    ("png-info", {"image": "?"}, 422, "image: not valid base64"),
    ("options", {"CLIP_stop_at_last_layers": 40}, 422, "CLIP_stop_at_last_layers must lie in 1..12"),
    ("txt2img", {**SMALL, "override_settings": {"CLIP_stop_at_last_layers": 0}}, 422,
     "override_settings: CLIP_stop_at_last_layers must lie in 1..12"),
]


@pytest.mark.parametrize("route, body, status, words", BAD, ids=[f"{r}-{w[:30]}" for r, _, _, w in BAD])
def test_bad_input_is_a_4xx_naming_the_field(client, route, body, status, words):
    detail = post(client, route, body, status)["detail"]
    assert words in detail, detail


def test_malformed_json_and_oversized_bodies(folders):
    store = ModelStore(models_dir=folders["models"])
    limits = Limits(max_body_bytes=10_000, max_image_pixels=100 * 100)
    with TestClient(create_app(Settings(store, limits))) as client:
        answer = client.post("/sdapi/v1/txt2img", content=b'{"prompt": "a', headers={"content-type": "application/json"})
        assert answer.status_code == 422 and "JSON decode error" in answer.json()["detail"]
        answer = client.post("/sdapi/v1/txt2img", json={"prompt": "x" * 20_000})
        assert answer.status_code == 413 and "at most 10000 bytes" in answer.json()["detail"]

        def chunks():  # no Content-Length: refused once the limit has arrived
            for _ in range(20):
                yield b" " * 1000
        answer = client.post("/sdapi/v1/txt2img", content=chunks(), headers={"content-type": "application/json"})
        assert answer.status_code == 413
        big = encoded(Image.new("L", (101, 100)))
        answer = client.post("/sdapi/v1/png-info", json={"image": big})
        assert answer.status_code == 422 and "at most 10000 pixels" in answer.json()["detail"]


def test_no_script_training_extension_or_cmd_flag_endpoints(client):
    for route in ("/sdapi/v1/cmd-flags", "/sdapi/v1/scripts", "/sdapi/v1/script-info", "/sdapi/v1/extensions",
                  "/sdapi/v1/train/embedding", "/sdapi/v1/create/hypernetwork", "/sdapi/v1/server-kill",
                  "/sdapi/v1/server-restart", "/docs", "/openapi.json"):
        assert client.get(route).status_code in (404, 405)
        assert client.post(route, json={}).status_code in (404, 405)


# ---- who may call


def test_basic_auth(folders):
    store = ModelStore(models_dir=folders["models"])
    with TestClient(create_app(Settings(store, credentials=[("alice", "s3cret"), ("bob", "hunter2")]))) as client:
        assert client.get("/sdapi/v1/samplers").status_code == 401
        assert client.get("/sdapi/v1/samplers").headers["www-authenticate"].startswith("Basic")
        assert client.get("/metrics", auth=("alice", "wrong")).status_code == 401
        assert client.get("/internal/ping", auth=("alice", "hunter2")).status_code == 401
        assert client.get("/sdapi/v1/samplers", auth=("bob", "hunter2")).status_code == 200
        assert post_with_auth(client, ("alice", "s3cret")).status_code == 200


def post_with_auth(client, auth):
    return client.post("/sdapi/v1/txt2img", json={**SMALL, "steps": 2}, auth=auth)


def test_credentials():
    assert parse_credentials("alice:s3:cret,bob:x") == [("alice", "s3:cret"), ("bob", "x")]
    for bad in ("alice", "alice:", ":pass", "a:b,,c:d"):
        with pytest.raises(ValueError, match="USER:PASS"):
            parse_credentials(bad)
    allowed = [("alice", "s3cret")]
    assert credentials_match("alice", "s3cret", allowed)
    assert not any(credentials_match(u, p, allowed) for u, p in [("alice", "s3cre"), ("alic", "s3cret"),
                                                                  ("alice", "s3cret "), ("", "")])


def test_a_non_loopback_bind_needs_credentials(capsys):
    for host in ("127.0.0.1", "::1", "localhost"):
        check_bind(host, None)
    check_bind("0.0.0.0", [("alice", "s3cret")])
    for host in ("0.0.0.0", "192.168.1.5", "::", "myhost.example"):
        with pytest.raises(ValueError, match="without --api-auth"):
            check_bind(host, None)
    with pytest.raises(SystemExit) as exit:
        main(["serve", "--host", "0.0.0.0", "--port", "1"])
    assert exit.value.code == 2 and "--host 0.0.0.0 would accept connections" in capsys.readouterr().err


def test_a1111_sampler_names_round_trip():
    for name, ours in [("Euler a", "euler_a"), ("k_euler_a", "euler_a"), ("euler", "euler"), ("DPM++ 2M", "dpmpp_2m"),
                       ("PLMS", "pndm"), ("UniPC", "unipc"), ("DDIM", "ddim"), ("DDPM", "ddpm")]:
        assert parse_sampler(name) == (ours, None)
    assert parse_sampler("Euler Karras") == ("euler", True) == parse_sampler("Euler", "Karras")
    assert parse_sampler("UniPC", "karras") == ("unipc", True)


def test_parse_infotext_reads_quoted_values_and_multiline_prompts():
    text = 'a cat,\nwith a hat\nNegative prompt: dog\nugly\nSteps: 20, Sampler: Euler a, Lora hashes: "a: 1, b: 2"'
    assert parse_infotext(text) == {"Prompt": "a cat,\nwith a hat", "Negative prompt": "dog\nugly", "Steps": "20",
                                    "Sampler": "Euler a", "Lora hashes": "a: 1, b: 2"}
    assert parse_infotext("just a prompt") == {"Prompt": "just a prompt", "Negative prompt": ""}


def test_the_cli_png_carries_a1111s_sampler_name(tmp_path):
    assert main(["generate", PROMPT, "--steps", "2", "--sampler", "dpmpp_2m", "--out", str(tmp_path), "--quiet"]) == 0
    text = Image.open(next(tmp_path.glob("*.png"))).text["parameters"]
    assert "Steps: 2, Sampler: DPM++ 2M, Schedule type: Automatic, CFG scale: 2.0, Seed: 0, Size: 64x64, " \
           "Model: toy-shapes, Version: diffusion-core " in text


def test_infotext_is_the_one_generated_images_carry(shapes):
    result = shapes.generate(config(use_karras_sigmas=True), progress=False)
    assert infotext(result).split("\n")[1].startswith("Steps: 8, Sampler: Euler, Schedule type: Karras, ")


def test_a_diffusers_folder_is_one_checkpoint(tmp_path):
    (tmp_path / "sd15" / "unet").mkdir(parents=True)
    (tmp_path / "sd15" / "model_index.json").write_text("{}")
    (tmp_path / "sd15" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    (tmp_path / "single.ckpt").write_bytes(b"weights")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    listing = ModelStore(models_dir=tmp_path).checkpoints()
    assert [(c.name, c.model_name) for c in listing] == [("sd15", "sd15"), ("single.ckpt", "single")]
