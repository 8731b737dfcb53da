"""WordNet builder: parsing, counts against the real files, split, labels, errors."""

from __future__ import annotations

import collections

import pytest

from train.data import wordnet
from train.data.records import TfdsSplit

SPLITS = ("train", "validation", "test")
FIELDS = {k: k for k in ("synset_id", "pos", "ss_type", "lexname", "label", "gloss", "text")}


def _real_lines(files_dir, pos_file):
    with open(files_dir / f"data.{pos_file}", encoding="utf-8") as fh:
        return sum(1 for line in fh if not line.startswith("  ") and line.strip())


@pytest.fixture(scope="module")
def built(wordnet_data_dir, wordnet_files_dir):
    return wordnet.Wordnet(wordnet_dir=wordnet_files_dir, data_dir=wordnet_data_dir)


@pytest.fixture(scope="module")
def rows(built):
    """split -> list of records (scalar fields only) of the full dataset."""
    return {s: list(TfdsSplit(built.info, s, FIELDS).iter_range()) for s in SPLITS}


def test_counts_per_pos_match_data_files(rows, wordnet_files_dir):
    counts = collections.Counter(r["pos"] for s in SPLITS for r in rows[s])
    expected = {pos: _real_lines(wordnet_files_dir, f) for f, pos in wordnet.POS_FILES.items()}
    assert dict(counts) == expected
    assert all(n > 1000 for n in expected.values())  # Real files, not a stub.


def test_known_synset_dog(built, rows):
    sid, split = "n02084071", wordnet.split_of("n02084071")
    (index,) = [i for i, r in enumerate(rows[split]) if r["synset_id"] == sid]
    fields = {k: k for k in ("lemmas", "examples", "hypernyms")} | FIELDS
    dog = TfdsSplit(built.info, split, fields)[index]
    assert dog["lemmas"] == ["dog", "domestic dog", "Canis familiaris"]
    assert wordnet.LEXNAMES[dog["lexname"]] == "noun.animal"
    assert dog["label"] == dog["lexname"]
    assert dog["hypernyms"] == ["n02083346", "n01317541"]
    assert dog["examples"] == ["the dog barked all night"]
    assert dog["gloss"].startswith("a member of the genus Canis")
    assert dog["gloss"].endswith("occurs in many breeds")
    assert dog["text"] == dog["gloss"]
    assert (dog["pos"], dog["ss_type"]) == ("n", "n")


def test_split_is_deterministic_disjoint_and_80_10_10(rows):
    ids = {s: [r["synset_id"] for r in rows[s]] for s in SPLITS}
    sets = {s: set(v) for s, v in ids.items()}
    assert sum(len(v) for v in ids.values()) == len(set.union(*sets.values()))  # Disjoint.
    for s in SPLITS:
        assert all(wordnet.split_of(i) == s for i in ids[s])  # Hash rule, reproducible.
    total = sum(len(v) for v in ids.values())
    assert abs(len(ids["train"]) / total - 0.8) < 0.01
    assert abs(len(ids["validation"]) / total - 0.1) < 0.01
    assert abs(len(ids["test"]) / total - 0.1) < 0.01
    assert wordnet.split_of("n02084071") == wordnet.split_of("n02084071")


def test_all_45_lexnames_present_and_consistent_with_pos(built, rows):
    assert built.info.features["lexname"].names == list(wordnet.LEXNAMES)
    assert built.info.features["label"].names == list(wordnet.LEXNAMES)
    assert len(wordnet.LEXNAMES) == 45
    seen = {r["lexname"] for s in SPLITS for r in rows[s]}
    assert seen == set(range(45))
    prefix = {"n": "noun.", "v": "verb.", "a": "adj.", "r": "adv."}
    for r in rows["validation"]:
        assert wordnet.LEXNAMES[r["lexname"]].startswith(prefix[r["pos"]]), r


def test_satellites_keep_pos_a_and_ss_type_s(rows):
    adj = collections.Counter(r["ss_type"] for s in SPLITS for r in rows[s] if r["pos"] == "a")
    assert set(adj) == {"a", "s"} and adj["s"] > 1000
    assert all(r["synset_id"][0] == r["pos"] for r in rows["test"])


# A few real lines (plus the license header) for fast checks of the parser and the env var.
SUBSET = {
    "noun": [
        "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 ~ 00002137 n 0000 ~ 04424418 n 0000 "
        "| that which is perceived or known or inferred to have its own distinct existence "
        "(living or nonliving)  ",
        "00060548 04 n 02 Hegira 1 Hejira 1 001 @i 00058743 n 0000 | the flight of Muhammad "
        "from Mecca to Medina in 622 which marked the beginning of the Muslim era; the Muslim "
        "calendar begins in that year  ",
    ],
    "verb": [
        "00002325 29 v 01 respire 1 005 $ 00001740 v 0000 @ 02108395 v 0000 + 03110323 a 0101 "
        "+ 00831191 n 0103 + 00830811 n 0101 01 + 02 00 | undergo the biomedical and metabolic "
        "processes of respiration by taking up oxygen and producing carbon monoxide  ",
    ],
    "adj": [
        "00019731 00 s 02 handy 0 ready_to_hand(p) 0 002 & 00019131 a 0000 + 04718999 n 0101 "
        '| easy to reach; "found a handy spot for the can opener"  ',
    ],
    "adv": [
        '00001740 02 r 01 a_cappella 0 000 | without musical accompaniment; "they performed a '
        'cappella"; "sung a cappella"  ',
    ],
}
HEADER = "  1 This software and database is being provided to you, the LICENSEE, by  \n"


@pytest.fixture
def subset_dir(tmp_path):
    d = tmp_path / "wn"
    d.mkdir()
    for f, lines in SUBSET.items():
        (d / f"data.{f}").write_text(HEADER + "  2   \n" + "\n".join(lines) + "\n")
    return d


def test_parse_lines():
    s = wordnet.parse_line(SUBSET["verb"][0], "v")
    assert s.synset_id == "v00002325" and s.lemmas == ["respire"]
    assert s.hypernyms == ["v02108395"]  # '$' (verb group) is not a hypernym.
    assert wordnet.LEXNAMES[s.lexname] == "verb.body"
    s = wordnet.parse_line(SUBSET["noun"][1], "n")
    assert s.hypernyms == ["n00058743"]  # '@i' instance hypernym.
    assert s.lemmas == ["Hegira", "Hejira"] and s.examples == []
    assert s.gloss.endswith("begins in that year")
    s = wordnet.parse_line(SUBSET["adj"][0], "a")
    assert (s.pos, s.ss_type, s.lemmas) == ("a", "s", ["handy", "ready to hand"])
    assert s.gloss == "easy to reach" and s.examples == ["found a handy spot for the can opener"]
    s = wordnet.parse_line(SUBSET["adv"][0], "r")
    assert s.synset_id == "r00001740" and s.examples == [
        "they performed a cappella",
        "sung a cappella",
    ]


def test_split_gloss_keeps_quotes_inside_definition():
    gloss, ex = wordnet.split_gloss('progress (in the phrase "make strides"); "big strides"')
    assert gloss == 'progress (in the phrase "make strides")' and ex == ["big strides"]
    assert wordnet.split_gloss('a change: "conversion from F to C"') == (
        "a change",
        ["conversion from F to C"],
    )


def test_builds_from_wordnet_dir_env(subset_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WORDNET_DIR", str(subset_dir))
    b = wordnet.Wordnet(data_dir=str(tmp_path / "tfds")).prepare()
    assert b.wordnet_dir == subset_dir
    total = sum(b.info.splits[s].num_examples for s in b.info.splits)
    assert total == sum(len(v) for v in SUBSET.values())


def test_missing_dir_error_names_dir_and_fix(tmp_path):
    missing = tmp_path / "no_wordnet_here"
    with pytest.raises(FileNotFoundError) as e:
        wordnet.Wordnet(wordnet_dir=missing, data_dir=str(tmp_path / "tfds")).prepare()
    msg = str(e.value)
    assert str(missing) in msg
    for hint in ("wordnet-base", "apt-get install wordnet-base", "config.data.wordnet_dir"):
        assert hint in msg
    assert "$WORDNET_DIR" in msg


def test_fast_reader_matches_tfds_data_source(built):
    """records.TfdsSplit decodes exactly what tfds' own (TF-free) data source does."""
    keys = ("synset_id", "pos", "ss_type", "lexname", "label", "gloss", "text", "lemmas")
    keys += ("examples", "hypernyms")
    ours = TfdsSplit(built.info, "validation", {k: k for k in keys})
    theirs = built.as_data_source("validation")
    assert len(ours) == len(theirs)
    decode = lambda v: v.decode() if isinstance(v, bytes) else v
    for i in range(0, len(ours), 97):
        ref = theirs[i]
        got = ours[i]
        for k in keys:
            want = [decode(x) for x in ref[k]] if isinstance(ref[k], list) else decode(ref[k])
            assert got[k] == want, (i, k)
