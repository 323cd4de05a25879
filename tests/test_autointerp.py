"""The autointerp suite: the tokens judge on the demo SAE against a control (another latent's explanation), and the
openai judge against a local server that speaks the chat-completions protocol (prompts recorded and checked, a 429
then success, a timeout then success, a malformed reply, an interrupted run that resumes without asking twice)."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from saelab.suites.judges import TokensJudge, Window, marked
from tests.test_outputs import _fails


def test_the_tokens_judge_reads_back_what_it_explains():
    judge = TokensJudge()
    w = [Window([" the", " king", " said"], [0.0, 2.0, 0.1]), Window([" a", " king", " \"ran"], [0.0, 1.5, 0.0]),
         Window([" the", " queen", "!"], [0.0, 1.0, 0.0])]
    expl = judge.explain(w)
    assert expl.startswith('tokens "king"') and judge.listed(expl) == {"king", "queen"}
    assert judge.listed('tokens "a \\"b" "c"') == {'a "b', "c"}
    assert judge.detect(expl, [Window([" no", " king"], [0, 0]), Window([" no", " one"], [0, 0])]) == [True, False]
    assert judge.fuzz(expl, w[:1] * 2, [[False, True, False], [True, False, False]]) == [True, False]
    assert marked([" a", " b", " c", " d"], [False, True, True, False]) == " a<< b c>> d"


def test_tokens_explanations_beat_another_latents_on_the_demo_sae(demo_sae, capsys):
    """50 latents of the demo's layer-1 SAE: detection with a latent's own explanation beats detection with the next
    sampled latent's by at least 0.1 (acceptance), and the control is near chance."""
    from saelab.cli import main
    from saelab.layout import read_eval
    from saelab.suites.autointerp import AUTOINTERP_FILE, load_explanations

    assert main(["eval", "--sae", str(demo_sae), "--suite", "autointerp", "--model", "tiny", "--quiet"]) == 0
    ev = read_eval(demo_sae)["autointerp"]
    assert ev["explainer"] == "tokens" and ev["n_latents"] == 50
    assert ev["detection"] >= ev["detection_control"] + 0.1, ev
    assert 0.4 <= ev["detection_control"] <= 0.6 and ev["fuzzing"] is not None
    assert "autointerp:" in capsys.readouterr().out
    expl = load_explanations(demo_sae)
    assert sorted(expl) == ev["latents"] and all(e.startswith("tokens ") for e in expl.values())
    record = json.loads((demo_sae / AUTOINTERP_FILE).read_text())
    assert set(record["judges"]["tokens"]["latents"]) == {str(j) for j in ev["latents"]}
    assert record["judges"]["tokens"]["setting"]["split"] == ev["split"] == "holdout"


class _Server:
    """A chat-completions endpoint on localhost: it records each request and answers by ``plan`` (one entry per
    request, then "ok"): "ok", "429" (with retry-after-ms), "sleep" (longer than the client waits), "malformed",
    "400". An "ok" explanation names the first marked token; a verdict marks a text 1 when it holds that token."""

    def __init__(self, plan=()):
        self.plan, self.requests, self.lock = list(plan), [], threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests.append((self.path, body))
                    mode = outer.plan.pop(0) if outer.plan else "ok"
                if mode == "sleep":
                    time.sleep(5)
                    return
                if mode in ("429", "400"):
                    self._send(int(mode), {"error": {"message": "slow down" if mode == "429" else "bad request",
                                                     "type": "x"}}, {"retry-after-ms": "10"})
                    return
                system, user = body["messages"][0]["content"], body["messages"][1]["content"]
                self._send(200, {"id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                     "role": "assistant", "content": outer.answer(system, user, mode)}}],
                                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

            def _send(self, code, obj, headers=None):
                data = json.dumps(obj).encode()
                try:
                    self.send_response(code)
                    for k, v in {"Content-Type": "application/json", "Content-Length": str(len(data)),
                                 **(headers or {})}.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @staticmethod
    def answer(system, user, mode):
        if mode == "malformed":
            return "I think most of them do."
        if system.startswith("You explain"):
            m = re.search(r"<<(.*?)>>", user)
            return f"the token {(m.group(1) if m else '?').strip()}\nmore text the judge drops"
        n = int(re.search(r"JSON list of (\d+) integers", user).group(1))
        word = re.match(r"Explanation: the token (.*)", user).group(1).strip()
        texts = re.findall(r"^\d+\. (.*)$", user, re.M)[:n]
        return json.dumps([int(word in t) for t in texts])

    def prompts(self, kind):
        return [b for _, b in self.requests if b["messages"][0]["content"].startswith(kind)]

    def close(self):
        self.httpd.shutdown()


@pytest.fixture
def server():
    made = []

    def make(plan=()):
        made.append(_Server(plan))
        return made[-1]

    yield make
    for s in made:
        s.close()


def _argv(sae, url, *extra):
    return ["eval", "--sae", str(sae), "--suite", "autointerp", "--model", "tiny", "--explainer", "openai",
            "--openai-url", url, "--openai-model", "judge-1", "--autointerp-latents", "3", "--openai-timeout", "2",
            "--quiet", *extra]


def test_openai_judge_prompts_retries_and_scores(demo_sae, server, capsys):
    """A 429 and a timeout are retried (the same prompt arrives again) and the run succeeds; the prompts are the
    chat-completions protocol's, with the marked windows, the explanation and the count of texts; the explanations
    are the endpoint's first line."""
    from saelab.cli import main
    from saelab.layout import read_eval
    from saelab.suites.autointerp import load_explanations

    s = server(["429", "ok", "sleep"])
    assert main(_argv(demo_sae, s.url)) == 0
    paths = {p for p, _ in s.requests}
    assert paths == {"/v1/chat/completions"} and all(b["model"] == "judge-1" for _, b in s.requests)
    assert s.requests[0][1] == s.requests[1][1]  # the 429'd prompt, asked again
    assert s.requests[2][1] == s.requests[3][1]  # the timed-out prompt, asked again
    explain = s.prompts("You explain")
    assert len({json.dumps(b) for b in explain}) == 3 and all("<<" in b["messages"][1]["content"] for b in explain)
    detect = s.prompts("You test an explanation of a feature of a language model. For each")
    assert len(detect) == 6  # each latent: its own explanation and the control's
    assert all(re.search(r"JSON list of 20 integers", b["messages"][1]["content"]) for b in detect)
    assert len(s.prompts("You test an explanation of a feature of a language model. In each")) == 3
    ev = read_eval(demo_sae)["autointerp"]
    assert ev["explainer"] == "openai:judge-1" and ev["n_latents"] == 3
    assert all(e.startswith("the token ") and "\n" not in e for e in load_explanations(demo_sae).values())
    capsys.readouterr()


def test_openai_judge_failures_are_one_line_and_a_rerun_asks_nothing_twice(demo_sae, server, capsys):
    from saelab.suites.autointerp import AUTOINTERP_FILE

    bad = server(["ok", "ok", "ok", "malformed"])  # three explanations, then a reply that is no list
    _fails(_argv(demo_sae, bad.url), capsys, "is not a JSON list of 20 0/1 values")
    stopped = server(["400"])
    _fails(_argv(demo_sae, stopped.url), capsys, "answered 400")
    assert len(stopped.requests) == 1 and not stopped.prompts("You explain")  # the explanations were kept
    done = json.loads((demo_sae / AUTOINTERP_FILE).read_text())
    asked_before = {json.dumps(b) for s in (bad, stopped) for _, b in s.requests}
    good = server()
    from saelab.cli import main

    assert main(_argv(demo_sae, good.url)) == 0
    again = [b for _, b in good.requests if json.dumps(b) in asked_before]
    # only the prompt that failed before is asked again (its answer never came): nothing answered is asked twice
    assert len(again) == 1 and len(good.requests) == 9 and not good.prompts("You explain")
    assert len(json.loads((demo_sae / AUTOINTERP_FILE).read_text())["judges"]) == len(done["judges"])
    unreachable = "http://127.0.0.1:9/v1"
    _fails([*_argv(demo_sae, unreachable), "--autointerp-latents", "5"], capsys, "could not reach")
    # five latents: only those not explained before are explained; a kept latent whose control partner changed is
    # scored against its new partner (its own detection is kept)
    from saelab.layout import read_eval

    before = json.loads((demo_sae / AUTOINTERP_FILE).read_text())["judges"]["openai:judge-1"]["latents"]
    more = server()
    assert main([*_argv(demo_sae, more.url), "--autointerp-latents", "5"]) == 0
    now = read_eval(demo_sae)["autointerp"]["latents"]
    new = [j for j in now if str(j) not in before]
    assert len(more.prompts("You explain")) == len(new) and len(now) == 5
    partners = {j: now[(i + 1) % 5] for i, j in enumerate(now)}
    moved = [j for j in now if str(j) in before and before[str(j)]["control_latent"] != partners[j]]
    own = "You test an explanation of a feature of a language model. For each"
    assert len(more.prompts(own)) == 2 * len(new) + len(moved)
    _fails(["eval", "--sae", demo_sae, "--suite", "autointerp", "--model", "tiny", "--explainer", "openai"], capsys,
           "needs a model: pass --openai-model")
