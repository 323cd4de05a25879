"""The judges of the autointerp suite: who explains a latent from its top windows, and who scores an explanation by
reading windows (detection: is the feature in this text? fuzzing: are the marked tokens what it describes?).

- ``TokensJudge`` (``--explainer tokens``): deterministic and offline. Its explanation is the latent's most frequent
  activating tokens, written ``tokens "king" "queen"``; it scores by reading that list back: a text shows the
  feature when it holds one of those tokens, marked tokens match when most of them are among them.
- ``OpenAIJudge`` (``--explainer openai``): any OpenAI-compatible chat-completions endpoint (vLLM, a local server,
  a hosted API) through the official ``openai`` client, which retries 429s, 5xx answers and timeouts with
  exponential backoff (``MAX_RETRIES``); every other failure, and a reply that is not what the prompt asked for,
  is a one-line error.

A window is (tokens, activations); the judges mark the tokens a latent fires on as ``<<token>>``.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass

from saelab.errors import SaelabError, first_line

#: tokens an explanation of the tokens judge lists at most
N_TOKENS = 5
MAX_RETRIES = 4
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


@dataclass
class Window:
    tokens: list[str]  # decoded token strings
    acts: list[float]  # the latent's activation on each


def marked(tokens: list[str], marks: list[bool]) -> str:
    """The window's text with the marked tokens as <<token>> (a run of marked tokens in one pair)."""
    out, open_ = [], False
    for tok, m in zip(tokens, marks):
        if m and not open_:
            out.append("<<")
        if not m and open_:
            out.append(">>")
        out.append(tok)
        open_ = m
    return "".join(out + ([">>"] if open_ else []))


def activating(w: Window) -> list[bool]:
    """The tokens a window's latent fires on."""
    return [a > 0 for a in w.acts]


class TokensJudge:
    """Explains by the most frequent activating tokens; scores by reading them back."""

    id = "tokens"

    def explain(self, windows: list[Window]) -> str:
        counts: Counter = Counter()
        for w in windows:
            top = max(w.acts)
            counts.update(t.strip() for t, a in zip(w.tokens, w.acts) if a > 0 and a >= 0.5 * top and t.strip())
        picked = [t for t, _ in counts.most_common(N_TOKENS)]
        return "tokens " + " ".join(json.dumps(t, ensure_ascii=False) for t in picked)

    @staticmethod
    def listed(explanation: str) -> set[str]:
        """The tokens an explanation of this judge lists."""
        return {json.loads(f'"{m}"') for m in _QUOTED.findall(explanation)}

    def detect(self, explanation: str, windows: list[Window]) -> list[bool]:
        toks = self.listed(explanation)
        return [any(t.strip() in toks for t in w.tokens) for w in windows]

    def fuzz(self, explanation: str, windows: list[Window], marks: list[list[bool]]) -> list[bool]:
        toks = self.listed(explanation)
        out = []
        for w, m in zip(windows, marks):
            chosen = [t.strip() for t, x in zip(w.tokens, m) if x]
            out.append(bool(chosen) and sum(t in toks for t in chosen) >= 0.5 * len(chosen))
        return out


_EXPLAIN = ("You explain features of a language model's activations. Below are texts where one feature is "
            "active; the tokens it fires on are marked <<like this>>. Say in one short phrase what the feature "
            "detects: a token, a word class, a context or a pattern. Reply with the phrase only.")
_DETECT = ("You test an explanation of a feature of a language model. For each numbered text, answer 1 if the "
           "feature the explanation describes is present in the text, else 0.")
_FUZZ = ("You test an explanation of a feature of a language model. In each numbered text some tokens are marked "
         "<<like this>>. Answer 1 if the marked tokens are ones the explanation describes, else 0.")


class OpenAIJudge:
    """Explains and scores through an OpenAI-compatible chat-completions endpoint."""

    def __init__(self, model: str | None = None, base_url: str | None = None, api_key: str | None = None,
                 timeout: float = 60.0):
        try:
            import openai
        except ImportError:
            raise SaelabError("--explainer openai needs the openai package: pip install openai (or "
                              "'saelab[autointerp]')") from None
        self.model = model or os.environ.get("SAELAB_OPENAI_MODEL")
        if not self.model:
            raise SaelabError("--explainer openai needs a model: pass --openai-model NAME (or set SAELAB_OPENAI_MODEL)")
        self.url = base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
        self.timeout = timeout
        self._openai = openai
        key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"  # local servers (vLLM) take any key
        self.client = openai.OpenAI(base_url=self.url, api_key=key, timeout=timeout, max_retries=MAX_RETRIES)
        self.id = f"openai:{self.model}"  # the model, not the URL: a server restarted elsewhere resumes the run

    def ask(self, system: str, user: str) -> str:
        """The endpoint's reply to one prompt; its failures as one-line errors (after the client's retries)."""
        o = self._openai
        try:
            r = self.client.chat.completions.create(model=self.model, temperature=0,
                                                    messages=[{"role": "system", "content": system},
                                                              {"role": "user", "content": user}])
        except o.AuthenticationError as e:
            raise SaelabError(f"the endpoint {self.url} refused the key ({e.status_code}): pass --openai-key or set "
                              "OPENAI_API_KEY") from None
        except o.NotFoundError:
            raise SaelabError(f"the endpoint {self.url} has no model {self.model!r} (404): pass --openai-model, one "
                              "the endpoint serves") from None
        except o.RateLimitError:
            raise SaelabError(f"the endpoint {self.url} answered 429 (rate limited) {MAX_RETRIES + 1} times: run the "
                              "command again later (latents explained so far are kept)") from None
        except o.APITimeoutError:
            raise SaelabError(f"the endpoint {self.url} gave no answer within {self.timeout:g} s, {MAX_RETRIES + 1} "
                              "times: raise --openai-timeout or check the server (latents explained so far are "
                              "kept)") from None
        except o.APIConnectionError as e:
            raise SaelabError(f"could not reach {self.url} ({first_line(e.__cause__ or e, 120)}): check "
                              "--openai-url") from None
        except o.APIStatusError as e:
            raise SaelabError(f"the endpoint {self.url} answered {e.status_code} ({first_line(e, 120)}): check "
                              "--openai-url and --openai-model") from None
        except o.APIError as e:  # a 200 whose body is no chat completion
            raise SaelabError(f"the endpoint {self.url} gave no chat completion ({first_line(e, 120)}): check "
                              "--openai-url points at an OpenAI-compatible /v1") from None
        try:
            text = r.choices[0].message.content
        except (AttributeError, IndexError, TypeError):
            text = None
        if not isinstance(text, str) or not text.strip():
            raise SaelabError(f"the endpoint {self.url} replied with no text to a prompt: check --openai-model is a "
                              "chat model")
        return text.strip()

    def explain(self, windows: list[Window]) -> str:
        user = "\n".join(f"{i + 1}. {marked(w.tokens, activating(w))}" for i, w in enumerate(windows))
        return self.ask(_EXPLAIN, user).splitlines()[0].strip()[:300]

    def _verdicts(self, system: str, explanation: str, texts: list[str], what: str) -> list[bool]:
        n = len(texts)
        user = (f"Explanation: {explanation}\n\n" + "\n".join(f"{i + 1}. {t}" for i, t in enumerate(texts))
                + f"\n\nReply with a JSON list of {n} integers, 0 or 1, one per text, and nothing else.")
        reply = self.ask(system, user)
        m = re.search(r"\[[^\[\]]*\]", reply)
        try:
            got = json.loads(m.group(0)) if m else None
        except ValueError:
            got = None
        if not isinstance(got, list) or len(got) != n or any(v not in (0, 1) for v in got):
            raise SaelabError(f"the endpoint's reply to a {what} prompt is not a JSON list of {n} 0/1 values "
                              f"({first_line(reply, 80)!r}): pass an --openai-model that follows instructions")
        return [bool(v) for v in got]

    def detect(self, explanation: str, windows: list[Window]) -> list[bool]:
        return self._verdicts(_DETECT, explanation, ["".join(w.tokens) for w in windows], "detection")

    def fuzz(self, explanation: str, windows: list[Window], marks: list[list[bool]]) -> list[bool]:
        return self._verdicts(_FUZZ, explanation, [marked(w.tokens, m) for w, m in zip(windows, marks)], "fuzzing")
