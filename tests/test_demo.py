"""demo.py: its API answers what sample.py writes, refuses bad input with a
4xx and keeps serving; in a real browser, a path drawn with the mouse moves
the object along it."""

import base64
import json
import os
import shutil
import threading
import urllib.error
import urllib.request

import imageio.v3 as iio
import numpy as np
import pytest
import torch

import data
import demo
import metrics
import sample
import scenes
from common import parse_flags
from test_sample import MICRO_SCENE


@pytest.fixture
def server(request):
    """A demo server on a free port, in this process: (its address, the checkpoint folder)."""
    folder, config = request.param if hasattr(request, "param") else (request.getfixturevalue("micro_folder"), "micro")
    opt = parse_flags(demo.FLAGS, [f"--config={config}", f"--checkpoints={folder}", "--port=0"], demo.__doc__)
    httpd = demo.serve(opt)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", folder
    httpd.shutdown()
    httpd.server_close()


def call(url, body=None, raw=None):
    """(status, headers, bytes) of a GET (no body) or a POST of JSON (or of raw bytes)."""
    payload = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=payload, method="GET" if payload is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def sample_gif(folder, scene, *args):
    """The bytes `python sample.py --scene S ...` writes for a scene (run in this process)."""
    (folder / "s.json").write_text(json.dumps(scene))
    sample.main(["--config=micro", f"--checkpoints={folder}", f"--scene={folder / 's.json'}", f"--out={folder / 's.gif'}",
                 *args])
    return (folder / "s.gif").read_bytes()


def test_generate_answers_exactly_what_sample_writes(server):
    url, folder = server
    for method, seed in (("naive", 0), ("naive", 3), ("teacher", 1)):
        status, headers, gif = call(f"{url}/api/generate", {"scene": MICRO_SCENE, "method": method, "seed": seed})
        assert status == 200 and headers["Content-Type"] == "image/gif" and float(headers["X-Seconds"]) > 0
        assert gif == sample_gif(folder, MICRO_SCENE, f"--method={method}", f"--seed={seed}"), (method, seed)
        progress = json.loads(call(f"{url}/api/progress")[2])
        assert progress["method"] == method and progress["done"] == progress["total"] == (100 if method == "teacher" else 4)
    status, _, gif = call(f"{url}/api/generate", {"scene": MICRO_SCENE, "method": "naive", "boxes": False})
    assert status == 200 and gif == sample_gif(folder, MICRO_SCENE, "--method=naive", "--boxes=false")


def test_an_uploaded_first_frame_travels_in_the_scene_and_reproduces_with_sample(server):
    url, folder = server
    frame = np.zeros((40, 40, 3), np.uint8)
    frame[8:20, 8:20] = (230, 40, 40)
    png = scenes.PNG_DATA_URL + base64.b64encode(iio.imwrite("<bytes>", frame, extension=".png")).decode()
    scene = {"size": 16, "frames": 4, "first_frame": png, "objects": [{"boxes": [[3, 3, 8, 8], [4, 4, 9, 9],
                                                                                   [5, 5, 10, 10], [6, 6, 11, 11]]}]}
    answer = json.loads(call(f"{url}/api/first_frame", {"scene": scene})[2])
    assert answer["image"].startswith(scenes.PNG_DATA_URL)
    assert answer["objects"] == [{"box": [3, 3, 8, 8], "center": [5.5, 5.5], "free": False}]
    status, _, gif = call(f"{url}/api/generate", {"scene": scene, "method": "naive"})
    assert status == 200 and gif == sample_gif(folder, scene, "--method=naive")


def test_bad_input_gets_a_4xx_naming_it_and_the_server_keeps_serving(server):
    url, folder = server
    star = dict(MICRO_SCENE, objects=[dict(MICRO_SCENE["objects"][0], shape="star")])
    (folder / "star.json").write_text(json.dumps(star))
    with pytest.raises(SystemExit) as refused:  # what sample.py says of the same scene
        sample.main(["--config=micro", f"--checkpoints={folder}", f"--scene={folder / 'star.json'}"])
    sample_message = str(refused.value.code).split(": ", 2)[2]  # without "error: <path>: "
    big_frame = scenes.PNG_DATA_URL + base64.b64encode(
        iio.imwrite("<bytes>", np.zeros((2000, 8, 3), np.uint8), extension=".png")).decode()
    bad = [  # (body, status, words the error must hold)
        ({"scene": star, "method": "naive"}, 400, "scene: " + sample_message),
        ({"scene": dict(MICRO_SCENE, size=64), "method": "naive"}, 400, "'size' 64"),
        ({"scene": MICRO_SCENE, "method": "best"}, 400, "unknown method 'best'"),
        ({"scene": MICRO_SCENE, "method": "flashmotion"}, 400, "method 'flashmotion' has no checkpoints"),
        ({"scene": MICRO_SCENE, "method": "naive", "seed": -1}, 400, "'seed'"),
        ({"scene": MICRO_SCENE, "method": "naive", "seed": "1"}, 400, "'seed'"),
        ({"scene": MICRO_SCENE, "method": "naive", "boxes": "no"}, 400, "'boxes'"),
        ({"method": "naive"}, 400, "'scene': missing"),
        ({"scene": dict(MICRO_SCENE, first_frame="../checkpoints/slow_generator_micro.pt",
                        objects=[{"boxes": [[1, 1, 4, 4]] * 4}]), "method": "naive"}, 400,
         "'first_frame': a path names a file"),
        ({"scene": dict(MICRO_SCENE, first_frame=big_frame, objects=[{"boxes": [[1, 1, 4, 4]] * 4}]),
          "method": "naive"}, 400, "more than 1024 pixels"),
        ({"scene": "default.json", "method": "naive"}, 400, "a scene must be a JSON object"),
        ([1, 2], 400, "the body must be a JSON object"),
    ]
    for body, status, words in bad:
        answer = call(f"{url}/api/generate", body)
        assert answer[0] == status and words in json.loads(answer[2])["error"], (body, answer)
    for raw, status, words in [(b"{not json", 400, "malformed JSON"), (b"\xff\xfe", 400, "malformed JSON"),
                               (b"[" * 5000 + b"]" * 5000, 400, "malformed JSON: maximum recursion depth"),
                               (b" " * (demo.MAX_BODY + 1), 413, "over 1048576 bytes")]:
        answer = call(f"{url}/api/generate", raw=raw)
        assert answer[0] == status and words in json.loads(answer[2])["error"], (raw[:10], answer)
    assert call(f"{url}/api/random_scene", {"seed": 2 ** 40})[0] == 400
    for path in ("/../common.py", "/%2e%2e/demo.py", "/demo/index.html", "/checkpoints/slow_generator_micro.pt",
                 "/api/nothing"):
        status, _, payload = call(url + path)
        assert status == 404 and b"Traceback" not in payload, path
    assert b"Traceback" not in b"".join(call(f"{url}/api/generate", body)[2] for body, _, _ in bad)
    status, _, gif = call(f"{url}/api/generate", {"scene": MICRO_SCENE, "method": "naive"})  # still serving
    assert status == 200 and gif[:6] == b"GIF89a"
    assert call(url + "/")[0] == 200 and b"demo.js" in call(url + "/")[2]


def test_a_random_scene_is_a_scene_file_the_page_can_draw(server):
    url, _ = server
    spec = json.loads(call(f"{url}/api/random_scene", {"seed": 5})[2])
    scene = scenes.parse_scene(spec, allow_files=False)
    frame = json.loads(call(f"{url}/api/first_frame", {"scene": spec})[2])
    assert (scene.size, scene.frames) == (16, 4) and len(frame["objects"]) == len(scene.objects) >= 1
    assert [o["center"] for o in frame["objects"]] == [obj.centers[0].tolist() for obj in scene.objects]
    assert spec == json.loads(call(f"{url}/api/random_scene", {"seed": 5})[2])  # the seed decides


def test_a_port_in_use_or_no_checkpoints_is_one_line(micro_folder, tmp_path):
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit, match=f"cannot serve on 127.0.0.1:{port}"):
            demo.main(["--config=micro", f"--checkpoints={micro_folder}", f"--port={port}"])
    with pytest.raises(SystemExit, match="no method has its checkpoints"):
        demo.main(["--config=micro", f"--checkpoints={tmp_path / 'none'}", "--port=0"])


# ------------------------------------------------------------ the browser ---

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
SHIPPED = "checkpoints"


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1250,1000",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def clip_of(gif, size=32):
    """The generated clip of the page's GIF (clip 8x under its label, beside the maps): (T, 3, size, size) in [-1, 1]."""
    frames = iio.imread(gif, index=None, extension=".gif")[..., :3].astype(np.float32)  # (T, H, W, 3)
    clip = frames[:, -8 * size:, :8 * size].reshape(len(frames), size, 8, size, 8, 3).mean((2, 4))
    return torch.from_numpy(clip / 127.5 - 1).permute(0, 3, 1, 2)


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver (.ci/run)")
@pytest.mark.skipif(not os.path.exists(f"{SHIPPED}/fast_adapter_hybrid_controlnet_mask_tiny.pt"),
                    reason="needs the shipped checkpoints")
@pytest.mark.parametrize("server", [(SHIPPED, "tiny")], indirect=True)
def test_a_path_drawn_with_the_mouse_moves_the_object_along_it(server, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
    url, _ = server
    driver = browser()
    try:
        driver.get(url)
        WebDriverWait(driver, 30).until(lambda d: d.execute_script("return window.demo.image !== null"))
        objects = driver.execute_script("return window.demo.objects")  # scenes/default.json: square, circle, triangle
        canvas = driver.find_element(By.ID, "canvas")
        scale = canvas.size["width"] / 32
        at = lambda x, y: (round((x - 16) * scale), round((y - 16) * scale))  # offsets from the canvas's centre
        (cx, cy), steps = objects[1]["center"], 12  # drag the circle down and to the right
        drag = ActionChains(driver).move_to_element_with_offset(canvas, *at(cx, cy)).click_and_hold()
        for i in range(1, steps + 1):
            drag.move_to_element_with_offset(canvas, *at(cx + 1.6 * i, cy + 1.2 * i))
        drag.release().perform()
        driver.find_element(By.ID, "boxes").click()  # the clip alone, no boxes drawn over it
        driver.find_element(By.ID, "go").click()
        WebDriverWait(driver, 60).until(lambda d: d.execute_script("return window.demo.clips") == 1)
        scene = driver.execute_script("return window.demo.lastScene")
        print("flashmotion: %.2f s from the click to the clip, %.2f s generating (the page's own figures)" %
              tuple(driver.execute_script("return [window.demo.clickToClip, window.demo.lastSeconds]")))
        gif = base64.b64decode(driver.execute_async_script(
            "const done = arguments[0], reader = new FileReader();"
            "reader.onload = () => done(reader.result.split(',')[1]); reader.readAsDataURL(window.demo.lastGif);"))
        Select(driver.find_element(By.ID, "method")).select_by_value("teacher")  # 50 steps: a progress bar
        driver.find_element(By.ID, "go").click()
        WebDriverWait(driver, 60).until(lambda d: d.execute_script(
            "const bar = document.getElementById('progress'); return !bar.hidden && bar.value > 0"))
        WebDriverWait(driver, 120).until(lambda d: d.execute_script("return window.demo.clips") == 2)
        captions = [c.text for c in driver.find_elements(By.CSS_SELECTOR, "#gallery figcaption")]
        assert [c.split(",")[0] for c in captions] == ["teacher", "flashmotion"] and all(" s" in c for c in captions)
        driver.save_screenshot(str(tmp_path / "demo.png"))
        if os.environ.get("FLASHMOTION_SCREENSHOT"):
            shutil.copy(tmp_path / "demo.png", os.environ["FLASHMOTION_SCREENSHOT"])
        assert "from the click to the clip" in driver.find_element(By.ID, "status").text
    finally:
        driver.quit()
    assert len(scene["objects"][1]["path"]) > 5 and scene["objects"][0]["path"] == [objects[0]["center"]]
    target = data.to_sample(data.render(scenes.parse_scene(scene)), 32)  # where the drawn path puts every object
    video = clip_of(gif)
    moved = {key: target[key][1:2] for key in ("masks", "boxes", "colors")}
    circle = metrics.trajectory_accuracy(video, target["video"], moved["masks"], moved["boxes"], moved["colors"], 1)
    everything = metrics.trajectory_accuracy(video, target["video"], target["masks"], target["boxes"], target["colors"],
                                             target["n_objects"])
    end = torch.tensor(scene["objects"][1]["path"][-1]) - torch.tensor([cx, cy])
    assert end.norm() > 15  # the circle travels half the frame
    assert circle["miou"] > 0.5 and circle["center_err_px"] < 2.5, circle
    assert everything["miou"] > 0.5, everything
