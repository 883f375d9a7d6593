"""The fake engine for bulk job tests: a tokenizer with a chat template, and an account of
every request it starts (to prove that no line of a job ran twice across processes)."""

from __future__ import annotations

import os

from fake_engine import ByteTokenizer, FakeEngine

EXEC_LOG_ENV = "MII_FAKE_EXEC_LOG"  # a folder; each worker process appends to <pid>.log


class ChatByteTokenizer(ByteTokenizer):
    chat_template = "<role>content...<assistant>"

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return super().encode(text)


def chat_text(messages) -> str:
    return ChatByteTokenizer().apply_chat_template(messages)


class CountingEngine(FakeEngine):
    def __init__(self, log_dir: str | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.tokenizer = ChatByteTokenizer()
        self.log_path = None if not log_dir else os.path.join(log_dir, f"{os.getpid()}.log")

    def add_request(self, request_id, prompt_token_ids, params, generated_token_ids=()):
        super().add_request(request_id, prompt_token_ids, params, generated_token_ids)
        if self.log_path is not None:
            with open(self.log_path, "a") as log:  # one short write: whole lines survive kill -9
                log.write(f"{request_id} {len(generated_token_ids)}\n")


def make_counting_engine(mii_config, replica: int) -> CountingEngine:
    """Engine factory (`--engine-factory bulk_engine:make_counting_engine`)."""
    delay = float(os.environ.get("MII_FAKE_STEP_DELAY", "0"))
    max_len = mii_config.model_conf.max_length or 4096
    return CountingEngine(os.environ.get(EXEC_LOG_ENV), max_model_len=max_len, step_delay_s=delay)


def executions(log_dir: str, name: str | None = None) -> list[tuple[str, int]]:
    """(request id, tokens it resumed from) of every request any worker (or the worker
    logging to `name`) started."""
    started = []
    for log_name in [name] if name else sorted(os.listdir(log_dir)):
        if not os.path.exists(os.path.join(log_dir, log_name)):
            continue
        with open(os.path.join(log_dir, log_name)) as log:
            for line in log:
                rid, resumed = line.split()
                started.append((rid, int(resumed)))
    return started
