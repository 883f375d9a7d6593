"""The main job on a fresh machine: fetch the demo model and stream a completion."""

from __future__ import annotations

import sys

import mii
from mii.engine.demo_model import ensure_demo_model


def main() -> None:
    question = " ".join(sys.argv[1:]) or "What is the capital of France?"
    path = str(ensure_demo_model())
    pipe = mii.pipeline(path)
    chat = [{"role": "user", "content": question}]
    prompt = pipe.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    print(f"> {question}")
    for delta in pipe.stream(prompt, max_new_tokens=128, do_sample=False):
        print(delta.generated_text, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
