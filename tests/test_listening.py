"""The browser listening test: the page `esn human export` writes, `esn human serve`, and a scripted rater in
a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium) whose answers go back
through `esn human import`."""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from esn.emotions import EMOTIONS
from esn.errors import EsnError
from esn.pipeline.listening import issue_codes, page, private_dir, read_codes, read_kit, write_page

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
NO_BROWSER = ("no headless browser: install Debian's chromium and chromium-driver "
              "(apt-get install chromium chromium-driver; .ci/run does) and selenium")


def _kit(root: Path, n: int = 4) -> Path:
    """A hand-made A/B kit: n trials of two short tones, as `esn human export` lays them out."""
    (root / "clips").mkdir(parents=True)
    rows = []
    for t in range(1, n + 1):
        for side, f0 in (("A", 220), ("B", 330)):
            wave = 0.1 * np.sin(2 * np.pi * f0 * np.arange(3200) / 16_000)
            sf.write(root / f"clips/t{t:03d}_{side}.wav", wave.astype(np.float32), 16_000, subtype="PCM_16")
        rows.append({"trial": t, "emotion": "sad", "clip_a": f"clips/t{t:03d}_A.wav", "clip_b": f"clips/t{t:03d}_B.wav",
                     "question": "Which clip sounds more sad? </script><b>A</b>, B or tie."})
    with (root / "trials.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (root / "key.csv").write_text("trial,emotion,a,b,a_id,b_id\n1,sad,intervened,baseline,SECRET1,SECRET2\n")
    return root


# -- the page and the kit, without a browser ------------------------------------------------------------


def test_page_embeds_the_trials_and_never_the_key(tmp_path):
    kit = read_kit(_kit(tmp_path / "kit"))
    assert kit.kind == "ab" and [t["id"] for t in kit.trials] == ["1", "2", "3", "4"] and len(kit.id) == 16
    html = write_page(kit.dir).read_text()
    assert "SECRET" not in html and "intervened" not in html
    assert "</script><b>" not in html  # a question cannot end the JSON's <script> element
    data = json.loads(html.split('<script type="application/json" id="kit">')[1].split("</script>")[0])
    assert data["trials"][0]["question"].startswith("Which clip sounds more sad? </script>")
    assert data["columns"] == ["rater", "trial", "choice"] and [c["value"] for c in data["choices"]] == ["A", "B", "tie"]
    assert "http://" not in html.replace("http://www.w3.org", "") and "https://" not in html  # no external assets
    assert page(kit) == html


def test_answers_are_checked_and_written_as_the_import_format(tmp_path):
    kit = read_kit(_kit(tmp_path / "kit"))
    assert kit.responses_csv("r1", {"3": "tie", "1": "A"}) == "rater,trial,choice\nr1,1,A\nr1,3,tie\n"
    with pytest.raises(EsnError, match="unknown trial '9'"):
        kit.check_answers({"9": "A"})
    with pytest.raises(EsnError, match="answer 'C' must be one of A, B, tie"):
        kit.check_answers({"1": "C"})


def test_a_kit_must_be_a_kit(tmp_path):
    with pytest.raises(EsnError, match="not a listening kit"):
        read_kit(tmp_path)
    root = _kit(tmp_path / "kit")
    (root / "trials.csv").write_text("trial,emotion,clip_a,clip_b,question\n1,sad,../key.csv,clips/t001_B.wav,q\n")
    with pytest.raises(EsnError, match=r"'\.\./key\.csv' is not a wav file under clips/"):
        read_kit(root)


SEPARATORS = "\u2028\u2029\x85\x0b\x0c\x1c\x1d\x1e"  # all that str.splitlines ends a line at, but CSV does not


def test_unicode_line_separators_in_a_question_are_text(tmp_path):
    root = _kit(tmp_path / "kit")
    odd = f"Which clip{SEPARATORS}sounds more sad?"
    text = (root / "trials.csv").read_text()
    (root / "trials.csv").write_text(text.replace("Which clip sounds more sad? </script><b>A</b>, B or tie.", odd))
    kit = read_kit(root)
    assert [t["question"] for t in kit.trials] == [odd] * 4
    html = write_page(root).read_text()
    assert "\u2028" not in html and "\u2029" not in html  # escaped inside the embedded JSON
    data = json.loads(html.split('<script type="application/json" id="kit">')[1].split("</script>")[0])
    assert data["trials"][0]["question"] == odd
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from esn.serve.server import launch

    with launch(["human", "serve", str(root), "--port", "0"], ready_path="/api/kit", env=ENV) as server:
        assert httpx.get(server.url + "/").text == html
    (root / "trials.csv").write_text("trial,emotion,clip_a,clip_b,question\n1,sad\n")
    with pytest.raises(EsnError, match="line 2: not the header's 5 fields"):
        read_kit(root)


@pytest.fixture(scope="module")
def served_kit(tmp_path_factory):
    pytest.importorskip("fastapi")
    from esn.serve.server import launch

    root = _kit(tmp_path_factory.mktemp("served") / "kit")
    write_page(root)
    with launch(["human", "serve", str(root), "--port", "0"], ready_path="/api/kit", env=ENV) as server:
        server.kit = read_kit(root)
        yield server


def test_human_serve_api(served_kit):
    httpx = pytest.importorskip("httpx")
    url, kit = served_kit.url, served_kit.kit
    assert httpx.get(url + "/api/kit").json() == {"id": kit.id, "kind": "ab", "trials": 4, "codes": False}
    assert httpx.get(url + "/").text == page(kit)
    assert httpx.get(url + "/clips/t001_A.wav").content == (kit.dir / "clips/t001_A.wav").read_bytes()
    for path in ("/key.csv", "/trials.csv", "/clips/../key.csv", "/clips/%2e%2e%2fkey.csv", "/clips/nope.wav"):
        response = httpx.get(url + path)
        assert response.status_code == 404 and "SECRET" not in response.text, path
    put = lambda rater, body: httpx.put(f"{url}/api/responses/{rater}", json=body)  # noqa: E731
    assert put("r1", {"kit": kit.id, "answers": {"2": "B", "1": "tie"}}).json() == {
        "rater": "r1", "saved": 2, "file": "responses/r1.csv"}
    assert (kit.dir / "responses/r1.csv").read_text() == "rater,trial,choice\nr1,1,tie\nr1,2,B\n"
    assert httpx.get(url + "/api/responses/r1").json() == {"rater": "r1", "answers": {"1": "tie", "2": "B"}}
    assert httpx.get(url + "/api/responses/nobody").json() == {"rater": "nobody", "answers": {}}
    for rater, body, status, code in (
        ("r1", {"kit": "another", "answers": {}}, 409, "wrong_kit"),
        ("r1", {"kit": kit.id, "answers": {"1": "maybe"}}, 422, "bad_answers"),
        ("r1", {"kit": kit.id, "answers": {"7": "A"}}, 422, "bad_answers"),
        ("r1", {"kit": kit.id, "answers": ["A"]}, 422, "bad_answers"),
        ("bad.name", {"kit": kit.id, "answers": {}}, 400, "bad_rater"),
    ):
        response = put(rater, body)
        assert (response.status_code, response.json()["error"]) == (status, code), response.text
    response = httpx.put(url + "/api/responses/r1", content=b"{not json")
    assert (response.status_code, response.json()["error"]) == (400, "bad_json")
    assert (kit.dir / "responses/r1.csv").read_text() == "rater,trial,choice\nr1,1,tie\nr1,2,B\n"  # untouched
    # Many raters at once, each sending growing answer sets in order: every file ends complete and current.
    def rater(k: int):
        with httpx.Client() as client:
            for n in range(1, 5):
                answers = {str(t): "AB"[(t + k) % 2] for t in range(1, n + 1)}
                assert client.put(f"{url}/api/responses/p{k}", json={"kit": kit.id, "answers": answers}).status_code == 200
        return answers

    with ThreadPoolExecutor(8) as pool:
        final = list(pool.map(rater, range(8)))
    for k, answers in enumerate(final):
        assert kit.read_responses(kit.dir / f"responses/p{k}.csv") == answers
    assert not list((kit.dir / "responses").glob(".*"))  # no temp files left


def test_human_serve_refuses_foreign_hosts_and_cross_origin_writes(served_kit):
    httpx = pytest.importorskip("httpx")
    url, kit = served_kit.url, served_kit.kit
    for path in ("/", "/api/kit", "/clips/t001_A.wav", "/api/responses/r1"):
        response = httpx.get(url + path, headers={"Host": "evil.example"})  # DNS rebinding
        assert response.status_code == 400 and response.json()["error"] == "host_not_allowed", path
    answers = {"kit": kit.id, "answers": {"1": "A"}}
    other_local = url.rsplit(":", 1)[0] + ":1"  # another origin on this machine
    for headers in ({"Origin": "http://evil.example"}, {"Origin": other_local}, {"Origin": "null"},
                    {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}):
        response = httpx.put(url + "/api/responses/x1", json=answers, headers=headers)
        assert response.status_code == 403 and response.json()["error"] == "cross_origin", headers
        # a form post, which a browser sends cross-origin without asking first
        response = httpx.post(url + "/api/login", data={"code": "x"}, headers=headers)
        assert response.status_code == 403 and response.json()["error"] == "cross_origin", headers
    assert not (kit.dir / "responses/x1.csv").exists()
    assert httpx.put(url + "/api/responses/x1", json=answers, headers={"Origin": url}).status_code == 200


def test_fuzzed_human_serve_requests_never_get_a_500_and_every_error_is_json(served_kit):
    """The listening API's own OpenAPI schema (the app publishes none: built in this process), fuzzed against
    the live server with schemathesis's strategies, fitting the schema and not: no 500, every error JSON."""
    schemathesis = pytest.importorskip("schemathesis")
    from esn.serve.listening import create_listening_app
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_dict(create_listening_app(served_kit.kit).openapi())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {(op.method.upper(), op.path) for op in operations} >= {("PUT", "/api/responses/{rater}"),
                                                                   ("POST", "/api/login")}
    cases = st.one_of([op.as_strategy(generation_mode=mode) for op in operations for mode in GenerationMode])
    seen = set()

    @settings(max_examples=150, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(cases)
    def check(case):
        response = case.call(base_url=served_kit.url, timeout=30)
        seen.add((case.method, case.path))
        assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
        if response.status_code >= 400:
            assert response.headers.get("content-type", [""])[0].startswith("application/json"), response.text[:200]
            assert isinstance(response.json().get("error"), str)

    check()
    assert len(seen) == len(operations)


def test_human_serve_with_codes_admits_only_issued_raters(tmp_path, capsys):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from esn.cli import main
    from esn.serve.server import launch

    root = _kit(tmp_path / "kit")
    write_page(root)
    codes_file = issue_codes(root, 3)
    assert codes_file == private_dir(root) / "codes.csv" and root not in codes_file.parents
    codes = {rater: code for code, rater in read_codes(codes_file).items()}
    assert sorted(codes) == ["r01", "r02", "r03"] and len(set(codes.values())) == 3
    inside = root / "codes.csv"
    inside.write_bytes(codes_file.read_bytes())
    assert main(["human", "serve", str(root), "--port", "0", "--codes", str(inside)]) != 0
    assert "lies in the kit folder raters get" in capsys.readouterr().err
    inside.unlink()
    # Serving other machines needs codes (or saying --insecure-no-token), before anything is bound.
    assert main(["human", "serve", str(root), "--host", "0.0.0.0", "--port", "0"]) != 0
    assert "--host 0.0.0.0 serves other machines" in capsys.readouterr().err
    with launch(["human", "serve", str(root), "--host", "0.0.0.0", "--port", "0", "--insecure-no-token"],
                ready_path="/api/kit", env=ENV) as server:
        assert httpx.get(server.url + "/api/kit").json()["codes"] is False
    kit = read_kit(root)
    body = {"kit": kit.id, "answers": {"1": "A", "2": "B"}}
    bearer = lambda code: {"Authorization": f"Bearer {code}"}  # noqa: E731
    with launch(["human", "serve", str(root), "--port", "0", "--codes", str(codes_file)], ready_path="/api/kit",
                env=ENV) as server:
        url = server.url
        assert httpx.get(url + "/api/kit").json()["codes"] is True
        assert httpx.post(url + "/api/login", json={"code": codes["r02"]}).json() == {"rater": "r02"}
        for given in ({"code": "guess-guess"}, {"code": codes["r02"][:-1]}, {}, ["x"]):
            response = httpx.post(url + "/api/login", json=given)
            assert response.status_code == 401 and response.json()["error"] == "bad_code", given
        # One client making up raters: every one refused, no file written.
        for k in range(40):
            response = httpx.put(f"{url}/api/responses/m{k}", json=body, headers=bearer(f"made-up-{k}"))
            assert response.status_code == 401 and response.json()["error"] == "bad_code"
        response = httpx.put(url + "/api/responses/r01", json=body)
        assert response.status_code == 401 and response.json()["error"] == "bad_code"
        response = httpx.put(url + "/api/responses/r01", json=body, headers=bearer(codes["r02"]))
        assert response.status_code == 403 and response.json()["error"] == "wrong_rater"
        assert httpx.get(url + "/api/responses/r01", headers=bearer(codes["r02"])).status_code == 403
        assert not (root / "responses").exists()
        assert httpx.put(url + "/api/responses/r01", json=body, headers=bearer(codes["r01"])).status_code == 200
        assert httpx.get(url + "/api/responses/r01", headers=bearer(codes["r01"])).json()["answers"] == body["answers"]
    assert sorted(p.name for p in (root / "responses").iterdir()) == ["r01.csv"]


# -- a scripted rater in headless Chromium -----------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip(NO_BROWSER)
    webdriver = pytest.importorskip("selenium.webdriver", reason=NO_BROWSER)
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # The flags that work on a machine with no network: no background connections, no sandbox as root.
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--mute-audio", f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp())}"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    yield driver
    driver.quit()


def rate(driver, url: str, rater: str, answers: list[str], *, reload_after: int, login: str | None = None) -> Path:
    """Answer the kit at ``url`` in order (``answers[k]`` for trial k + 1), listening to every clip first;
    reload the page after ``reload_after`` answers and check it resumes there. Odd trials are played and
    answered with the keyboard (Space, the answer's key), even ones with the mouse; the arrows go back and
    forth once. ``login``: what the rater types (their code when the server requires codes; default the
    rater id). Returns the downloaded CSV."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, 30)
    el = lambda id_: driver.find_element(By.ID, id_)  # noqa: E731
    press = lambda key: driver.find_element(By.TAG_NAME, "body").send_keys(key)  # noqa: E731
    n = len(answers)
    driver.get(url)
    wait.until(lambda d: el("start").is_displayed())
    el("rater").send_keys(login or rater)
    el("begin").click()
    for k, choice in enumerate(answers):
        if k == reload_after:
            driver.refresh()  # localStorage: back at the first unanswered trial, rater remembered
        wait.until(lambda d, k=k: el("progress").text == f"Trial {k + 1} of {n}")
        assert el("who").text == rater
        assert el("answered").text == f"{k} of {n} answered" and el("bar").get_attribute("value") == str(k)
        buttons = driver.find_elements(By.CSS_SELECTOR, "#players button")
        button = el(f"choice-{choice}")
        key = button.find_element(By.TAG_NAME, "kbd").text  # the shortcut, shown on the button
        assert not button.is_enabled()  # not before every clip was heard to the end
        if k % 2:
            press(key.lower())  # ignored: the clips are not heard yet
            assert el("progress").text == f"Trial {k + 1} of {n}"
            for played in buttons:
                press(Keys.SPACE)  # plays the next clip not yet heard
                wait.until(lambda d, b=played: "heard" in b.get_attribute("class"))
            press(key.lower())
        else:
            for played in buttons:
                played.click()
                wait.until(lambda d, b=played: "heard" in b.get_attribute("class"))
            button.click()
        if k == 0:
            wait.until(lambda d: el("progress").text == f"Trial 2 of {n}")
            press(Keys.ARROW_LEFT)
            wait.until(lambda d: el("progress").text == f"Trial 1 of {n}")
            assert "chosen" in el(f"choice-{choice}").get_attribute("class")
            press(Keys.ARROW_RIGHT)
    wait.until(lambda d: el("done").is_displayed())
    before = set(driver.downloads.iterdir())
    el("download").click()
    deadline = time.time() + 30
    while time.time() < deadline:
        new = [p for p in set(driver.downloads.iterdir()) - before if p.suffix == ".csv"]
        if new:
            return new[0]
        time.sleep(0.1)
    raise AssertionError("the page did not download the responses")


def _esn(*args):
    """The esn command, in this process (the same code path, without a second start-up)."""
    from esn.cli import main

    assert main([str(a) for a in args]) == 0


@pytest.mark.slow
@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason=NO_BROWSER)
def test_a_rater_completes_an_ab_kit_in_the_browser(browser, demo, tmp_path):
    pytest.importorskip("fastapi")
    from esn.serve.server import launch

    cfg, kit = demo / "demo.toml", tmp_path / "ab-kit"
    _esn("human", "export", cfg, "--kind", "ab", "--per-emotion", "1", "--out", kit, "--raters", "2")
    private = tmp_path / "ab-kit-private"
    assert sorted(p.name for p in private.iterdir()) == ["codes.csv", "key.csv"]
    assert not (kit / "key.csv").exists() and not (kit / "codes.csv").exists()  # not in the raters' folder
    key = {r["trial"]: r for r in csv.DictReader((private / "key.csv").open())}
    assert len(key) == 4 and (kit / "index.html").is_file()
    html = (kit / "index.html").read_text()
    assert "intervened" not in html and not any(r["a_id"] in html for r in key.values())  # blind
    questions = [t["question"] for t in csv.DictReader((kit / "trials.csv").open())]
    assert "Which clip sounds more surprised? Answer A, B or tie." in questions  # an adjective, not the noun
    assert not any("more surprise?" in q for q in questions)
    code = {r["rater"]: r["code"] for r in csv.DictReader((private / "codes.csv").open())}["r02"]
    # win, loss, tie, win: pick the intervened clip, then the baseline one, then tie, then intervened.
    side = {t: "A" if r["a"] == "intervened" else "B" for t, r in key.items()}
    other = {"A": "B", "B": "A"}
    answers = [side["1"], other[side["2"]], "tie", side["4"]]
    with launch(["human", "serve", kit, "--port", "0", "--codes", private / "codes.csv"], ready_path="/api/kit",
                env=ENV) as server:
        downloaded = rate(browser, server.url, "r02", answers, reload_after=2, login=code)
    stored = kit / "responses" / "r02.csv"
    expected = "rater,trial,choice\n" + "".join(f"r02,{t},{a}\n" for t, a in zip("1234", answers, strict=True))
    assert stored.read_text() == expected and downloaded.read_text() == expected
    for responses in (stored, downloaded):
        _esn("human", "import", cfg, "--kind", "ab", "--kit", kit, responses)
        result = json.loads((demo / "human" / "results.json").read_text())
        assert result["counts"]["average"] == {"win": 2, "tie": 1, "loss": 1, "n": 4}
        assert result["raters"] == {"r02": 4}


@pytest.mark.slow
@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason=NO_BROWSER)
def test_a_rater_labels_a_kit_opened_from_disk(browser, demo, tmp_path):
    cfg, kit = demo / "demo.toml", tmp_path / "labels-kit"
    _esn("human", "export", cfg, "--kind", "labels", "--per-emotion", "1", "--out", kit)
    key = {r["clip"]: r["id"] for r in csv.DictReader((tmp_path / "labels-kit-private" / "key.csv").open())}
    labels = [EMOTIONS[(k + 1) % len(EMOTIONS)] for k in range(len(key))]
    downloaded = rate(browser, (kit / "index.html").as_uri(), "r2", labels, reload_after=len(key) // 2)
    _esn("human", "import", cfg, "--kind", "labels", "--kit", kit, downloaded)
    rows = list(csv.DictReader((demo / "human" / "labels.csv").open()))
    assert {r["id"]: r["label"] for r in rows} == {key[str(k + 1)]: label for k, label in enumerate(labels)}
