from captioner.vocab import SPECIALS, Vocabulary, tokenize


def test_tokenize_lowercases_and_splits_punctuation():
    assert tokenize("A Dog's ball, on the GRASS.") == ["a", "dog's", "ball", "on", "the", "grass"]
    assert tokenize("Two dogs play ; one runs .") == ["two", "dogs", "play", "one", "runs"]


def test_build_keeps_frequent_words_most_frequent_first():
    vocab = Vocabulary.build(["a dog runs", "a dog sits", "a cat"], min_count=2)
    assert vocab.words == [*SPECIALS, "a", "dog"]


def test_encode_decode_round_trip_and_unknown_words():
    vocab = Vocabulary([*SPECIALS, "a", "dog", "runs"])
    ids = vocab.encode("A dog flies")
    assert ids == [vocab.bos_id, 4, 5, vocab.unk_id, vocab.eos_id]
    assert vocab.decode(ids) == "a dog"  # <unk>, <bos> and everything after <eos> never shown
    assert vocab.decode([4, 5, 6, vocab.eos_id, 4]) == "a dog runs"
    assert Vocabulary.from_dict(vocab.to_dict()).words == vocab.words
