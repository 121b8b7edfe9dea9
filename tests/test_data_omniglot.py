"""The embedded Omniglot subsets: integrity, roles, splits, polarity, determinism, speed."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mishield import data
from mishield.data import (
    OMNIGLOT_ROLES,
    OMNIGLOT_SHA256,
    load_embedded_omniglot,
    load_image_folders,
    materialize_omniglot,
    omniglot_class_name,
)
from mishield.errors import BadInputError, UsageError

ASSETS = Path(data.__file__).parent / "assets" / "omniglot"
# Characters per alphabet as the dataset's README counts them.
CHARACTERS = {"Balinese": 24, "Early_Aramaic": 22, "Greek": 24, "Japanese_(katakana)": 47, "Korean": 40,
              "Latin": 26, "Sanskrit": 42, "Tagalog": 17}


@pytest.fixture(scope="module")
def private_dir(tmp_path_factory) -> Path:
    """The default private materialisation (129 characters, 32 px). Read-only."""
    return materialize_omniglot(tmp_path_factory.mktemp("omniglot") / "private")


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.png"))}


# --- integrity ------------------------------------------------------------------------------


def test_shipped_zips_match_the_pinned_checksums_and_sha256sums():
    listed = dict(reversed(line.split()) for line in (ASSETS / "SHA256SUMS").read_text().splitlines() if line.strip())
    assert listed == OMNIGLOT_SHA256
    for name, digest in OMNIGLOT_SHA256.items():
        assert hashlib.sha256((ASSETS / name).read_bytes()).hexdigest() == digest


def test_licence_and_readme_ship_with_the_data():
    text = (ASSETS / "OMNIGLOT_LICENSE.txt").read_text()
    assert "Brenden Lake" in text and "MIT" in text and "Permission is hereby granted" in text
    assert "057f034baf2ecb8530bc5710e5a23584d2a519cc" in (ASSETS / "README.md").read_text()


def test_a_damaged_zip_is_refused(monkeypatch):
    monkeypatch.setitem(data.OMNIGLOT_SHA256, "images_background_small1.zip", "0" * 64)
    with pytest.raises(BadInputError, match="damaged"):
        load_embedded_omniglot("private", characters_per_alphabet=1)


def test_zips_that_disagree_about_a_shared_file_are_refused():
    def fake_zip(payload: bytes) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("set/Greek/character01/0394_01.png", payload)
        return buf.getvalue()

    same = data._omniglot_members([("a.zip", fake_zip(b"x")), ("b.zip", fake_zip(b"x"))])
    assert same == {"Greek/character01/0394_01.png": b"x"}
    with pytest.raises(BadInputError, match="disagree"):
        data._omniglot_members([("a.zip", fake_zip(b"x")), ("b.zip", fake_zip(b"y"))])


def test_greek_and_latin_are_identical_in_both_zips():
    files = []
    for name in sorted(OMNIGLOT_SHA256):
        with zipfile.ZipFile(ASSETS / name) as z:
            files.append({n.split("/", 1)[1]: z.read(n) for n in z.namelist()
                          if n.endswith(".png") and n.split("/")[1] in ("Greek", "Latin")})
    assert len(files[0]) == (24 + 26) * 20 and files[0] == files[1]


# --- the raw records ------------------------------------------------------------------------


def test_every_alphabet_has_its_characters_each_drawn_by_twenty_people():
    s = load_embedded_omniglot()
    assert s.alphabets == tuple(sorted(CHARACTERS)) and s.ink.shape == (4840, 105, 105) and s.ink.dtype == bool
    for i, name in enumerate(s.alphabets):
        mine = s.alphabet == i
        assert sorted(set(s.character[mine].tolist())) == list(range(1, CHARACTERS[name] + 1))
        for c in range(1, CHARACTERS[name] + 1):
            assert sorted(s.drawer[mine & (s.character == c)].tolist()) == list(range(1, 21))
    # the drawer and character are those of the file's own path
    for path, a, c, d in list(zip(s.paths, s.alphabet, s.character, s.drawer))[::97]:
        assert path == f"{s.alphabets[a]}/character{c:02d}/{path.split('/')[2]}" and path.endswith(f"_{d:02d}.png")
    # real drawings: a few percent ink, no two drawings alike in a sample
    assert 0.02 < s.ink.mean() < 0.15 and all(0 < s.ink[i].sum() < 0.5 * 105 * 105 for i in range(0, 4840, 50))
    assert len({s.ink[i].tobytes() for i in range(0, 4840, 7)}) == len(range(0, 4840, 7))


def test_ink_is_the_black_pixels_of_the_original_files():
    s = load_embedded_omniglot("private", characters_per_alphabet=1)
    with zipfile.ZipFile(ASSETS / "images_background_small1.zip") as z:
        raw = z.read(f"images_background_small1/{s.paths[25]}")  # a Korean drawing
    original = np.asarray(Image.open(io.BytesIO(raw)).convert("L"))
    assert s.paths[25].startswith("Korean/") and ((original == 0) == s.ink[25]).all()


def test_roles_count_and_share_no_character_or_drawing():
    private, public = load_embedded_omniglot("private"), load_embedded_omniglot("public")
    chars = {role: {(s.alphabets[a], int(c)) for a, c in zip(s.alphabet, s.character)}
             for role, s in (("private", private), ("public", public))}
    assert len(chars["private"]) == 129 and len(chars["public"]) == 113
    assert not chars["private"] & chars["public"]
    assert len(private.paths) == 129 * 20 and len(public.paths) == 113 * 20
    assert not set(OMNIGLOT_ROLES["private"]) & set(OMNIGLOT_ROLES["public"])
    assert set(OMNIGLOT_ROLES["private"]) | set(OMNIGLOT_ROLES["public"]) == set(CHARACTERS)
    # not even an identical image crosses the roles
    assert not {x.tobytes() for x in private.ink} & {x.tobytes() for x in public.ink}


def test_alphabet_choice_and_character_cap():
    s = load_embedded_omniglot(["Tagalog", "Greek"], characters_per_alphabet=3)
    assert [s.alphabets[a] for a in sorted(set(s.alphabet.tolist()))] == ["Greek", "Tagalog"]
    assert sorted(set(s.character.tolist())) == [1, 2, 3] and len(s.paths) == 2 * 3 * 20
    again = load_embedded_omniglot(["Greek", "Tagalog"], characters_per_alphabet=3)
    assert again.paths == s.paths and (again.ink == s.ink).all()


@pytest.mark.parametrize("kwargs, match", [
    ({"alphabets": "secret"}, "role"),
    ({"alphabets": ["Klingon"]}, "distinct names"),
    ({"alphabets": ["Greek", "Greek"]}, "distinct names"),
    ({"alphabets": "public", "characters_per_alphabet": 0}, "characters_per_alphabet"),
])
def test_bad_selections_are_usage_errors(kwargs, match):
    with pytest.raises(UsageError, match=match):
        load_embedded_omniglot(**kwargs)


# --- materialisation ------------------------------------------------------------------------


def test_default_private_folder_has_129_classes_and_the_drawer_split(private_dir):
    splits = load_image_folders(private_dir)
    assert splits.num_classes == 129 and len(splits.train) == 129 * 15 and len(splits.val) == 129 * 5
    for items, drawers in ((splits.train, set(range(1, 16))), (splits.val, set(range(16, 21)))):
        for label in range(129):
            got = {int(p.stem.rsplit("_", 1)[1]) for p, lab in items if lab == label}
            assert got == drawers
    alphabets = [name.split("_", 1)[1].rsplit("_", 1)[0] for name in splits.classes]
    assert {a: alphabets.count(a) for a in set(alphabets)} == {"japanese_katakana": 47, "korean": 40, "sanskrit": 42}


def _by_file_name(s) -> dict[str, int]:
    """File name (ID_DRAWER.png, unique over the dataset) -> index in the raw records."""
    return {path.rsplit("/", 1)[1]: i for i, path in enumerate(s.paths)}


def test_class_folders_sort_as_their_index(private_dir):
    splits = load_image_folders(private_dir)
    assert [int(n.split("_", 1)[0]) for n in splits.classes] == list(range(129))
    assert splits.classes[0] == omniglot_class_name(0, "Japanese_(katakana)", 1) == "000_japanese_katakana_01"
    assert splits.classes[47] == "047_korean_01" and splits.classes[-1] == "128_sanskrit_42"
    # the label ImageFolder gives each file is the character that file was drawn as
    s = load_embedded_omniglot("private")
    index = _by_file_name(s)
    for path, label in splits.train + splits.val:
        i = index[path.name]
        assert path.parent.name == omniglot_class_name(label, s.alphabets[s.alphabet[i]], int(s.character[i]))


def test_polarity_size_and_area_averaging(tmp_path, private_dir):
    native = materialize_omniglot(tmp_path / "n", "private", characters_per_alphabet=1, size=None)
    kept = materialize_omniglot(tmp_path / "k", "private", characters_per_alphabet=1, size=None, invert=False)
    s = load_embedded_omniglot("private", characters_per_alphabet=1)
    index = _by_file_name(s)
    files = sorted(native.rglob("*.png"))
    assert len(files) == 60
    for path in files:
        bright = np.asarray(Image.open(path))
        dark = np.asarray(Image.open(kept / path.relative_to(native)))
        assert bright.shape == (105, 105)
        assert (bright == np.where(s.ink[index[path.name]], 255, 0)).all()  # bright strokes on black: the ink
        assert (dark == 255 - bright).all()
    small = np.stack([np.asarray(Image.open(p)) for p, _ in load_image_folders(private_dir).train])
    assert small.shape[1:] == (32, 32) and small.dtype == np.uint8 and len(np.unique(small)) > 20  # grey edges, not 0/255
    # area averaging keeps the ink: mean brightness at 32 px is the ink fraction at 105 px
    ink = load_embedded_omniglot("private").ink
    train_ink = ink[load_embedded_omniglot("private").drawer <= 15]
    assert abs(small.mean() / 255 - train_ink.mean()) < 0.005


def test_materialisation_is_deterministic_and_independent_of_argument_order(tmp_path):
    a = materialize_omniglot(tmp_path / "a", ["Tagalog", "Latin"], characters_per_alphabet=2, size=28)
    b = materialize_omniglot(tmp_path / "b", ["Latin", "Tagalog"], characters_per_alphabet=2, size=28)
    da, db = _digests(a), _digests(b)
    assert da == db and len(da) == 4 * 20
    assert sorted(p.name for p in (a / "train").iterdir()) == ["000_latin_01", "001_latin_02", "002_tagalog_01", "003_tagalog_02"]


def test_custom_drawers_roles_and_no_val_folder(tmp_path):
    pub = materialize_omniglot(tmp_path / "pub", "public", characters_per_alphabet=1, val_drawers=(), train_drawers=range(1, 21))
    assert not (pub / "val").exists()
    splits = load_image_folders(pub)
    assert splits.num_classes == 5 and len(splits.train) == 5 * 20 and splits.val == []
    odd = materialize_omniglot(tmp_path / "odd", "private", characters_per_alphabet=1, train_drawers=[2, 4], val_drawers=[20])
    names = sorted(p.name for p in (odd / "train").rglob("*.png"))
    assert {n.rsplit("_", 1)[1] for n in names} == {"02.png", "04.png"} and len(names) == 6
    assert {p.name.rsplit("_", 1)[1] for p in (odd / "val").rglob("*.png")} == {"20.png"}


@pytest.mark.parametrize("kwargs, match", [
    ({"train_drawers": [1, 2], "val_drawers": [2, 3]}, "share drawers"),
    ({"train_drawers": []}, "train_drawers"),
    ({"train_drawers": [0, 1]}, "1..20"),
    ({"val_drawers": [21]}, "1..20"),
    ({"size": 4}, "size"),
])
def test_bad_materialisation_arguments(tmp_path, kwargs, match):
    with pytest.raises(UsageError, match=match):
        materialize_omniglot(tmp_path / "x", "private", characters_per_alphabet=1, **kwargs)


def test_refuses_to_mix_into_existing_files(tmp_path):
    dest = materialize_omniglot(tmp_path / "d", "public", characters_per_alphabet=1)
    with pytest.raises(UsageError, match="already holds files"):
        materialize_omniglot(dest, "private", characters_per_alphabet=1)
    materialize_omniglot(dest, "private", characters_per_alphabet=1, overwrite=True)
    assert load_image_folders(dest).classes == ["000_japanese_katakana_01", "001_korean_01", "002_sanskrit_01"]


def test_a_small_materialisation_decodes_only_what_it_writes(tmp_path):
    # What keeps a small materialisation fast (about 0.1 s) is the work it does, not a clock read
    # (a wall-clock bound fails on a loaded machine): only the 180 drawings it writes are decoded,
    # not the 4,840 of the zips, and they are written at 32 px.
    from PIL import Image

    from mishield.data import _omniglot_ink

    _omniglot_ink.cache_clear()
    dest = materialize_omniglot(tmp_path / "s", "private", characters_per_alphabet=3)
    written = sorted(dest.rglob("*.png"))
    assert len(written) == 9 * 20 == _omniglot_ink.cache_info().currsize
    with Image.open(written[0]) as img:
        assert img.size == (32, 32)


# --- the character augmentation -------------------------------------------------------------


def test_glyph_augmentation_never_mirrors_and_fills_with_background():
    """A drawing with ink only in its left half keeps it on the left under every draw, and what the
    affine jitter uncovers is black (the background), unlike train_transform's mirror."""
    import torch

    from mishield.data import glyph_train_transform, train_transform
    from mishield.preprocessing import Preprocessing

    pre = Preprocessing(input_size=(1, 32, 32), mean=(0.0,), std=(1.0,))
    left = np.zeros((32, 32), dtype=np.uint8)
    left[6:26, 4:12] = 255
    img = Image.fromarray(left, mode="L")

    def draws(transform, n: int = 60) -> list:
        torch.manual_seed(0)
        return [transform(img)[0] for _ in range(n)]

    glyph = draws(glyph_train_transform(pre))
    assert min(float(x[:, :16].sum() / x.sum()) for x in glyph) > 0.9
    assert all(x[:2, :2].max() == 0.0 and x[-2:, -2:].max() == 0.0 for x in glyph)  # corners stay background
    assert len({x.numpy().tobytes() for x in glyph}) == len(glyph)  # and it does jitter
    photo = draws(train_transform(pre))
    assert min(float(x[:, :16].sum() / x.sum()) for x in photo) < 0.1  # the photo augmentation mirrors some draws
