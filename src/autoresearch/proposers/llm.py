"""An LLM API as the proposer: any OpenAI-compatible chat-completions endpoint, or Anthropic's
Messages API, through the official SDKs (`openai`, `anthropic`).

Each proposal is one short conversation. The model is given the protocol, the history and the
current train.py (prompt.py) and answers with one DESCRIPTION line and search/replace blocks
(edits.py). A reply that is malformed, does not apply, edits only other files or leaves train.py
with a syntax error is sent back with the error, up to `edit_attempts` replies in all; blocks for
files other than train.py are ignored. Nothing is written until the edits apply.

Transport failures are the SDK's to retry: timeouts, connection errors, 408, 409, 429 and 5xx,
`max_retries` times, waiting as `retry-after` says (or backing off exponentially). When they are
spent, propose() raises with a message naming the API and the error; the lab records a crashed
proposal and goes on (after `backoff_after` failures in a row, the lab waits before the next one).

Cost: tokens times a price per million tokens, from a small table of known models or from
`price_per_mtok_in` / `price_per_mtok_out` (which win). Cached and cache-written input tokens are
charged as full input tokens, so with prompt caching the estimate is an upper bound. `max_cost`
(dollars) is a spend cap over the whole run: the spend is summed from the ledger's
`proposer_usage` of this proposer's rows, so it survives restarts, and once it is reached
propose() returns None and the loop stops (`stop_reason` says why). A proposal whose retries reach
the cap stops retrying.

Each proposal's conversation is kept as `transcript.json` in the folder the lab gives it
(`.autoresearch/proposals/N/`, N: the ledger row recording it), or, outside the loop, in
`.autoresearch/llm/N.json`. Proposals are independent conversations, so with several trial slots
they are asked at once (`concurrent`); the spend cap is then checked before each, and may be
passed by the proposals already under way.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from autoresearch.lab.ledger import Trial
from autoresearch.lab.proposer import ProposalContext, Proposer, check_settings

from .edits import FORMAT_HELP, EditError, apply_reply
from .prompt import RECENT, llm_prompt, next_trial_id

LLM_DIR = ".autoresearch/llm"
APIS = ("openai", "anthropic")
DEFAULT_KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}

# Dollars per million tokens (input, output), list prices as published when this table was written
# (OpenAI's and Anthropic's pricing pages). Estimates only: set price_per_mtok_in/out for a model
# not listed, for a price that changed, or to 0 for a local model. Names match exactly or with a
# date or -latest suffix, after an optional provider prefix (OpenRouter's `anthropic/...`).
PRICES: dict[str, tuple[float, float]] = {
    "gpt-5": (1.25, 10.0), "gpt-5-mini": (0.25, 2.0), "gpt-5-nano": (0.05, 0.4),
    "gpt-4.1": (2.0, 8.0), "gpt-4.1-mini": (0.4, 1.6), "gpt-4.1-nano": (0.1, 0.4),
    "gpt-4o": (2.5, 10.0), "gpt-4o-mini": (0.15, 0.6), "o3": (2.0, 8.0), "o4-mini": (1.1, 4.4),
    "claude-opus-4": (15.0, 75.0), "claude-opus-4-1": (15.0, 75.0), "claude-opus-4-5": (5.0, 25.0),
    "claude-opus-4-6": (5.0, 25.0), "claude-sonnet-4": (3.0, 15.0), "claude-sonnet-4-5": (3.0, 15.0),
    "claude-sonnet-4-6": (3.0, 15.0), "claude-haiku-4-5": (1.0, 5.0), "claude-3-7-sonnet": (3.0, 15.0),
    "claude-3-5-haiku": (0.8, 4.0),
}

SYSTEM = f"""\
You are an expert ML researcher running pretraining experiments on a small GPT. Each of your
answers is one experiment: a single, focused edit of train.py that you expect to lower val_bpb.
Think about what the history shows before choosing; keep the code simple and correct.

{FORMAT_HELP}"""

RETRY = """\
Your edit could not be applied: {error}
train.py is unchanged: it is still exactly as shown in my first message. Reply again in the same
format with the whole corrected edit (the DESCRIPTION line and every block)."""


class LLMError(RuntimeError):
    """The proposal failed (the API, or edits that never applied); the message says why."""


def model_price(model: str) -> tuple[float, float] | None:
    """The table's price for a model name, allowing a provider prefix (`openai/gpt-4o`) and a date
    or `-latest` suffix (`claude-sonnet-4-20250514`); None if the model is not in the table."""
    name = model.rsplit("/", 1)[-1].lower()
    if name in PRICES:
        return PRICES[name]
    for known in sorted(PRICES, key=len, reverse=True):
        rest = name[len(known):] if name.startswith(known) else None
        if rest and (rest == "-latest" or (rest[:2] == "-2" and rest[1:].replace("-", "").isdigit())):
            return PRICES[known]
    return None


@dataclass
class LLMProposer(Proposer):
    api: str  # "openai" (chat completions: OpenAI, vLLM, Ollama, OpenRouter, ...) or "anthropic"
    model: str
    api_key: str = field(repr=False, default="")
    api_key_env: str = ""
    base_url: str | None = None
    max_tokens: int = 16384  # per reply; reasoning models count their thinking in it
    max_tokens_param: str = "max_tokens"  # OpenAI's own API wants max_completion_tokens
    temperature: float | None = None
    extra_body: dict = field(default_factory=dict)  # more request fields, as the endpoint takes them
    timeout: float = 300.0  # seconds per request
    max_retries: int = 4  # the SDK's, per request: timeouts, connection errors, 408/409/429/5xx
    edit_attempts: int = 3  # replies per proposal: the first, then corrections
    max_cost: float | None = None  # dollars over the whole run; then propose() returns None
    price_in: float | None = None  # dollars per million input tokens
    price_out: float | None = None
    recent_trials: int = RECENT
    failure_backoff: float = 60.0
    backoff_after: int = 3
    name: str = "llm"
    concurrent = True  # each proposal is its own conversation: several may be asked at once
    stop_reason: str = ""
    _client: object = field(default=None, repr=False)

    @classmethod
    def from_settings(cls, workspace: Path, settings: dict) -> "LLMProposer":
        """From the `[llm]` table of autoresearch.toml. Keys (defaults): api ("openai"), model
        (required), base_url (the SDK's), api_key_env (OPENAI_API_KEY / ANTHROPIC_API_KEY),
        max_tokens (16384), max_tokens_param ("max_completion_tokens" for OpenAI itself, else
        "max_tokens"), temperature (the API's), extra_body ({}), timeout (300 s per request),
        max_retries (4), edit_attempts (3), max_cost (none), price_per_mtok_in/out (the table's),
        recent_trials (20), failure_backoff (60 s), backoff_after (3). ValueError if unusable."""
        settings = dict(settings or {})
        known = {"api", "model", "base_url", "api_key_env", "max_tokens", "max_tokens_param", "temperature",
                 "extra_body", "timeout", "max_retries", "edit_attempts", "max_cost", "price_per_mtok_in", "price_per_mtok_out",
                 "recent_trials", "failure_backoff", "backoff_after"}
        check_settings("llm", settings, known)
        api = str(settings.get("api", "openai")).lower()
        if api not in APIS:
            raise ValueError(f"[llm] api must be one of {', '.join(APIS)} (openai covers any OpenAI-compatible "
                             f"endpoint: vLLM, Ollama, OpenRouter), not {api!r}")
        model = str(settings.get("model") or "")
        if not model:
            raise ValueError("[llm] needs `model`, e.g. model = \"gpt-4.1\" or \"claude-sonnet-4-5\"")
        base_url = settings.get("base_url") or None
        key_env = str(settings.get("api_key_env") or DEFAULT_KEY_ENV[api])
        key = os.environ.get(key_env, "")
        if not key:
            if base_url is None:
                raise ValueError(f"the {api} API key is not set: put it in the environment variable {key_env} "
                                 "(or name another with [llm] api_key_env)")
            key = "none"  # a local server (vLLM, Ollama) usually takes any key
        price = model_price(model)
        price_in = settings.get("price_per_mtok_in", price[0] if price else None)
        price_out = settings.get("price_per_mtok_out", price[1] if price else None)
        max_cost = settings.get("max_cost")
        if max_cost is not None and (price_in is None or price_out is None):
            raise ValueError(f"[llm] max_cost needs the price of {model!r}, which the built-in table lacks: set "
                             "price_per_mtok_in and price_per_mtok_out (dollars per million tokens)")
        default_param = "max_completion_tokens" if api == "openai" and base_url is None else "max_tokens"
        proposer = cls(
            api=api, model=model, api_key=key, api_key_env=key_env, base_url=base_url,
            max_tokens=int(settings.get("max_tokens", cls.max_tokens)),
            max_tokens_param=str(settings.get("max_tokens_param", default_param)),
            temperature=None if settings.get("temperature") is None else float(settings["temperature"]),
            extra_body=dict(settings.get("extra_body") or {}),
            timeout=float(settings.get("timeout", cls.timeout)),
            max_retries=int(settings.get("max_retries", cls.max_retries)),
            edit_attempts=max(1, int(settings.get("edit_attempts", cls.edit_attempts))),
            max_cost=None if max_cost is None else float(max_cost),
            price_in=None if price_in is None else float(price_in),
            price_out=None if price_out is None else float(price_out),
            recent_trials=int(settings.get("recent_trials", RECENT)),
            failure_backoff=float(settings.get("failure_backoff", cls.failure_backoff)),
            backoff_after=int(settings.get("backoff_after", cls.backoff_after)),
        )
        try:
            proposer.client()  # fail now, not at the first proposal, if the SDK is missing
        except LLMError as e:
            raise ValueError(str(e)) from None
        return proposer

    # --- the API ----------------------------------------------------------------------------------
    def client(self):
        if self._client is None:
            try:
                sdk = __import__(self.api)
            except ImportError:
                raise LLMError(f"the llm proposer with api = \"{self.api}\" needs the `{self.api}` package: "
                               f"pip install {self.api}") from None
            cls = sdk.OpenAI if self.api == "openai" else sdk.Anthropic
            self._client = cls(api_key=self.api_key, base_url=self.base_url, timeout=self.timeout,
                               max_retries=self.max_retries)
        return self._client

    def _request(self, messages: list[dict]) -> tuple[str, bool, dict]:
        """One reply: (its text, whether it was cut off at max_tokens, token counts)."""
        sdk = __import__(self.api)
        body = dict(self.extra_body)
        if self.temperature is not None:  # sent as a body field: some SDK versions no longer name it
            body["temperature"] = self.temperature
        try:
            if self.api == "openai":
                response = self.client().chat.completions.create(
                    model=self.model, messages=[{"role": "system", "content": SYSTEM}, *messages],
                    extra_body={self.max_tokens_param: self.max_tokens, **body})
                choice = response.choices[0] if response.choices else None
                text = (choice.message.content if choice and choice.message else None) or ""
                cut = bool(choice and choice.finish_reason == "length")
                usage = response.usage
                tokens = {"input_tokens": getattr(usage, "prompt_tokens", 0) or 0,
                          "output_tokens": getattr(usage, "completion_tokens", 0) or 0}
            else:
                response = self.client().messages.create(model=self.model, system=SYSTEM, messages=messages,
                                                         max_tokens=self.max_tokens, extra_body=body or None)
                text = "".join(getattr(b, "text", "") for b in response.content if getattr(b, "type", "") == "text")
                cut = response.stop_reason == "max_tokens"
                usage = response.usage
                cached = (getattr(usage, "cache_read_input_tokens", 0) or 0) + \
                         (getattr(usage, "cache_creation_input_tokens", 0) or 0)
                tokens = {"input_tokens": (getattr(usage, "input_tokens", 0) or 0) + cached,
                          "output_tokens": getattr(usage, "output_tokens", 0) or 0}
        except sdk.APIError as e:
            raise LLMError(self._explain(sdk, e)) from None
        return text, cut, tokens

    def _explain(self, sdk, e: Exception) -> str:
        where = f"{self.api} API at {self.base_url or 'its default URL'}, model {self.model}"
        attempts = f"{self.max_retries + 1} attempt(s)"
        if isinstance(e, sdk.APITimeoutError):
            return f"the {where} did not answer within {self.timeout:g} s, {attempts}"
        if isinstance(e, sdk.APIConnectionError):
            return f"could not reach the {where} ({attempts}): {e}"
        status = getattr(e, "status_code", None)
        message = " ".join(str(getattr(e, "message", e)).split())[:400]
        if isinstance(e, sdk.AuthenticationError):
            return f"the {where} refused the key from ${self.api_key_env} (HTTP {status}): {message}"
        if isinstance(e, sdk.RateLimitError):
            return f"the {where} kept rate-limiting (HTTP 429) through {attempts}: {message}"
        retried = f" through {attempts}" if status and (status >= 500 or status in (408, 409)) else ""
        return f"the {where} answered HTTP {status}{retried}: {message}"

    def cost(self, tokens: dict) -> float | None:
        if self.price_in is None or self.price_out is None:
            return None
        return (tokens.get("input_tokens", 0) * self.price_in + tokens.get("output_tokens", 0) * self.price_out) / 1e6

    def spent(self, ctx: ProposalContext) -> float:
        """Dollars this proposer has spent in this workspace, from the ledger."""
        total = 0.0
        for t in ctx.history:
            if t.proposer == self.name and t.kind == "candidate":
                value = (t.proposer_usage or {}).get("cost_usd")
                if isinstance(value, (int, float)):
                    total += value
        return total

    # --- one proposal -----------------------------------------------------------------------------
    def propose(self, ctx: ProposalContext) -> str | None:
        spent = self.spent(ctx)
        if self.max_cost is not None and spent >= self.max_cost:
            self.stop_reason = f"the spend cap is reached: ${spent:.4f} of max_cost ${self.max_cost:.2f}"
            self.last_usage = None
            return None
        train = Path(ctx.workspace) / "train.py"
        original = train.read_text()
        messages = [{"role": "user", "content": llm_prompt(ctx, self.recent_trials, original)}]
        totals = {"input_tokens": 0, "output_tokens": 0}
        usage = {"api": self.api, "model": self.model, "requests": 0, **totals, "cost_usd": self.cost(totals),
                 "seconds": 0.0}
        self.last_usage = usage
        errors: list[str] = []
        started = time.monotonic()
        transcript = (ctx.scratch / "transcript.json" if ctx.scratch is not None
                      else Path(ctx.workspace) / LLM_DIR / f"{next_trial_id(ctx):05d}.json")
        try:
            for attempt in range(1, self.edit_attempts + 1):
                if attempt > 1 and self.max_cost is not None and spent + (usage["cost_usd"] or 0) >= self.max_cost:
                    raise LLMError(f"the spend cap (max_cost ${self.max_cost:.2f}) was reached while retrying; "
                                   f"the last error: {errors[-1]}")
                try:
                    text, cut, tokens = self._request(messages)
                finally:
                    usage["seconds"] = round(time.monotonic() - started, 3)
                usage["requests"] += 1
                for key in totals:
                    totals[key] += tokens[key]
                    usage[key] = totals[key]
                cost = self.cost(totals)
                usage["cost_usd"] = None if cost is None else round(cost, 6)
                messages.append({"role": "assistant", "content": text if text.strip() else "(an empty reply)"})
                try:
                    if not text.strip():
                        raise EditError("your reply was empty")
                    applied = apply_reply(text, original)
                except EditError as e:
                    error = ("your reply was cut off at the token limit, so it is incomplete; make the edit "
                             "smaller. " if cut else "") + str(e)
                    errors.append(error)
                    if attempt < self.edit_attempts:
                        messages.append({"role": "user", "content": RETRY.format(error=error)})
                    continue
                train.write_text(applied.text)
                if applied.ignored:
                    usage["ignored_files"] = applied.ignored
                if errors:
                    usage["edit_errors"] = [e[:300] for e in errors]
                return applied.description
            usage["edit_errors"] = [e[:300] for e in errors]
            raise LLMError(f"the model's edits did not apply in {self.edit_attempts} repl"
                           f"{'y' if self.edit_attempts == 1 else 'ies'}; the last error: {errors[-1]}")
        finally:
            _save(transcript, {"api": self.api, "model": self.model, "system": SYSTEM, "messages": messages,
                               "errors": errors, "usage": usage})

    def tell(self, trial: Trial) -> None:
        pass


def _save(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1))
    except OSError:
        pass
