"""Incremental detokenization: stop strings cut across token boundaries, and text that could
begin a stop string held back until it cannot."""

from decoder_service.detokenizer import IncrementalDetokenizer
from deploy.demo_checkpoint import build_tokenizer


def test_detokenizer_cuts_stop_strings_split_across_tokens():
    tokenizer = build_tokenizer(max_length=64)
    ids = tokenizer("the cat sat on the mat", add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, stop=("on th",))
    pieces = [detok.add(i) for i in ids]
    assert detok.stopped
    assert "".join(pieces) + detok.flush() == "the cat sat "
    plain = IncrementalDetokenizer(tokenizer)
    assert "".join(plain.add(i) for i in ids) + plain.flush() == "the cat sat on the mat"


def test_detokenizer_holds_back_a_possible_stop_prefix_until_the_end():
    tokenizer = build_tokenizer(max_length=64)
    detok = IncrementalDetokenizer(tokenizer, stop=("mat!",))
    emitted = [detok.add(i) for i in tokenizer("the mat", add_special_tokens=False)["input_ids"]]
    assert not "".join(emitted).endswith("mat")  # "mat" could begin "mat!"
    assert "".join(emitted) + detok.flush() == "the mat"
