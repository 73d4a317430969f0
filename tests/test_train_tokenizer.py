import json

import numpy as np

import _train_path  # noqa: F401
from aios_train.tokenizer import BOS_ID, EOS_ID, MASK_ID, PAD_ID, load_tokenizer, train_tokenizer
from aios_train.windows import make_windows


def test_tokenizer_special_ids_and_windows(tmp_path):
    texts = [f"The quick brown fox {i} jumps over the lazy dog. Ünïcödé ok." for i in range(200)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"source": "t", "text": t}) + "\n" for t in texts))
    train_tokenizer(tmp_path / "train.jsonl", tmp_path / "tok.json", vocab_size=300)
    tok = load_tokenizer(tmp_path / "tok.json")
    assert [tok.token_to_id(t) for t in ("[PAD]", "[BOS]", "[EOS]", "[MASK]")] == [PAD_ID, BOS_ID, EOS_ID, MASK_ID] == [0, 1, 2, 3]
    assert tok.get_vocab_size() == 300
    enc = tok.encode(texts[0], add_special_tokens=False)
    assert tok.decode(enc.ids) == texts[0]  # byte-level: lossless
    assert not set(enc.ids) & {0, 1, 2, 3}
    assert tok.encode("[MASK]", add_special_tokens=False).ids == [MASK_ID]
    w = make_windows(texts, tok, 16)
    assert w.shape[1] == 16 and (w[:, 0] == BOS_ID).all() and (w[:, -1] == EOS_ID).all()
    # MDLM wrap: body of each window = consecutive slice of the stream of (text + [EOS]).
    stream = []
    for t in texts:
        stream += tok.encode(t, add_special_tokens=False).ids + [EOS_ID]
    assert np.array_equal(w[:, 1:-1].reshape(-1), np.array(stream[: w.shape[0] * 14]))
