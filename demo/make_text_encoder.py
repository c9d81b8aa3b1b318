"""Stage make_text_encoder: the tiny Qwen3 text encoder and its tokenizer (assets/tiny/text_encoder/, Hugging Face
layout). Its weights stay random: a random language model still maps distinct captions to distinct hidden
states, which is all the DiT needs to tell "red" from "blue" (see README.md)."""
from common import MODEL_DIR, load_params
from flux2.text_encoder import write_tiny_text_encoder
from flux2.variants import VARIANTS


def main() -> None:
    p = load_params()
    out = write_tiny_text_encoder(MODEL_DIR / "text_encoder", VARIANTS["tiny"], seed=p["text_encoder"]["seed"])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
