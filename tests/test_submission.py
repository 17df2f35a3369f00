"""predictions.csv and its zip: format, validation, atomic writes, and the evaluator's command line."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import pytest
from conftest import REPO, mutate

from kinret.data.lists import GalleryRow, ProbeRow, write_gallery_list, write_probe_list
from kinret.errors import KinretInputError
from kinret.evaluate import main as evaluate_main
from kinret.scoring.ranking import rank_gallery
from kinret.submission.predictions import format_predictions, read_predictions, write_predictions


def test_round_trip_integers_zip_root_no_leftovers(tmp_path):
    ranking = rank_gallery(np.random.default_rng(0).normal(size=(4, 12)))
    write_predictions(ranking, tmp_path / "predictions.csv", tmp_path / "sub.zip")
    text = (tmp_path / "predictions.csv").read_text()
    assert "." not in text and "e" not in text and text.count("\n") == 4
    assert text.splitlines()[0] == ",".join(map(str, ranking[0]))
    with zipfile.ZipFile(tmp_path / "sub.zip") as zf:
        assert zf.namelist() == ["predictions.csv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.csv", "sub.zip"]
    np.testing.assert_array_equal(read_predictions(tmp_path / "sub.zip", 4, 12), ranking)
    # a rerun replaces, never appends
    write_predictions(ranking[::-1].copy(), tmp_path / "predictions.csv")
    np.testing.assert_array_equal(read_predictions(tmp_path / "predictions.csv", 4, 12), ranking[::-1])


def test_multi_digit_and_organisers_large_gallery(tmp_path):
    # the organisers' table prints 31,787 gallery faces: the writer/reader must handle it as well as 3,897
    ranking = np.stack([np.random.default_rng(i).permutation(31787) for i in range(3)])
    write_predictions(ranking, tmp_path / "p.csv")
    np.testing.assert_array_equal(read_predictions(tmp_path / "p.csv", 3, 31787), ranking)


def test_invalid_ranking_is_never_written(tmp_path):
    with pytest.raises(ValueError, match="row 1 .* not a permutation"):
        write_predictions(np.array([[0, 1, 2], [0, 0, 2]]), tmp_path / "p.csv")
    with pytest.raises(ValueError, match="integer"):
        write_predictions(np.array([[0.0, 1.0]]), tmp_path / "p.csv")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("text", "line", "message"), [
    ("a,b,c\n0,1,2\n", 1, "header"),
    ("0,1,2\n0,1.0,2\n", 2, "non-integer cell: '1.0'"),
    ("0,1,2\n0,2,2\n", 2, "not a permutation"),
    ("0,1,2\n0,1\n", 2, "not a permutation"),
    ("0,1,2\n3.0e+00,1,2\n", 2, "non-integer"),
])
def test_bad_predictions_name_the_first_bad_row(tmp_path, text, line, message):
    (tmp_path / "p.csv").write_text(text)
    with pytest.raises(KinretInputError, match=message) as info:
        read_predictions(tmp_path / "p.csv", 2, 3)
    assert info.value.line == line


def test_wrong_row_count(tmp_path):
    (tmp_path / "p.csv").write_text("0,1,2\n")
    with pytest.raises(KinretInputError, match="1 rows, expected one per probe \\(2\\)"):
        read_predictions(tmp_path / "p.csv", 2, 3)


@pytest.fixture
def truth(tmp_path):
    write_probe_list([ProbeRow("F0001/MID1", "F0001"), ProbeRow("F0002/MID2", "F0002")], tmp_path / "probe_list.csv")
    write_gallery_list([GalleryRow("F0002", "MID1", "F0002/MID1/a.jpg"),
                        GalleryRow("F0001", "MID2", "F0001/MID2/b.jpg"),
                        GalleryRow("F0003", "MID1", "F0003/MID1/c.jpg")], tmp_path / "gallery_list.csv")
    return tmp_path


def test_evaluate_cli_json(truth, capsys):
    (truth / "p.csv").write_text("1,0,2\n2,0,1\n")
    args = ["--predictions", str(truth / "p.csv"), "--probes", str(truth / "probe_list.csv"),
            "--gallery", str(truth / "gallery_list.csv"), "--json"]
    assert evaluate_main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mAP"] == pytest.approx((1 + 1 / 2) / 2) and out["rank@1"] == pytest.approx(1 / 2)
    assert out["average"] == pytest.approx(((1 + 1 / 2) / 2 + 1) / 2)
    assert (out["ap"], out["n_probes"], out["n_gallery"]) == ("standard", 2, 3)
    assert evaluate_main(args + ["--ap", "trapezoid"]) == 0
    assert json.loads(capsys.readouterr().out)["mAP"] == pytest.approx((1 + (0 / 1 + 1 / 2) / 2) / 2)


def test_evaluate_cli_exit_code_2_as_a_process(truth):
    (truth / "p.csv").write_text("1,0,2\n2,2,1\n")
    proc = subprocess.run([sys.executable, "-m", "kinret.evaluate", "--predictions", str(truth / "p.csv"),
                           "--probes", str(truth / "probe_list.csv"), "--gallery", str(truth / "gallery_list.csv")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert "p.csv, line 2" in proc.stderr and "not a permutation" in proc.stderr
    (truth / "p.csv").write_text("1,0,2\n2,0,1\n")
    proc = subprocess.run([sys.executable, "-m", "kinret.evaluate", "--predictions", str(truth / "p.csv"),
                           "--probes", str(truth / "probe_list.csv"), "--gallery", str(truth / "gallery_list.csv")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and "Average = (mAP + Rank@5) / 2" in proc.stdout and "standard AP" in proc.stdout


def test_evaluate_cli_malformed_list(truth, capsys):
    (truth / "p.csv").write_text("1,0,2\n2,0,1\n")
    (truth / "gallery_list.csv").write_text(",fid,mid,labels,ref\n0,F0002,MID1,2,F0002/MID1/a.jpg\n"
                                            "0,F0001,MID2,1,F0001/MID2/b.jpg\n")
    assert evaluate_main(["--predictions", str(truth / "p.csv"), "--probes", str(truth / "probe_list.csv"),
                          "--gallery", str(truth / "gallery_list.csv")]) == 2
    assert "gallery_list.csv, line 3: duplicate index 0" in capsys.readouterr().err


def test_the_csv_encoding_equals_a_naive_join_for_every_gallery_size():
    rng = np.random.default_rng(7)
    for n in (1, 9, 10, 11, 1001, 123457):
        ranking = np.stack([rng.permutation(n) for _ in range(3)])
        naive = "".join(",".join(map(str, row)) + "\n" for row in ranking.tolist()).encode()
        assert format_predictions(ranking) == naive
        assert format_predictions(ranking.astype(np.int32), chunk_rows=2) == naive


# --- any file at all: every bad predictions file is a KinretInputError naming the file (and row), never a crash ---

VALID = b"1,0,2\n2,0,1\n"  # a valid 2 x 3 ranking for the `truth` fixture
SIZE_400 = (400).to_bytes(4, "little")


def zipped(data: bytes, method: int = zipfile.ZIP_DEFLATED, names: tuple[str, ...] = ("predictions.csv",)) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=method) as zf, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Duplicate name", UserWarning)  # written on purpose by one case
        for name in names:
            zf.writestr(name, data)
    return buf.getvalue()


def patched(raw: bytes, central: int, local: int, value: bytes) -> bytes:
    """The zip with `value` written at offset `central` of its (first) central directory header and `local` of its
    local header, e.g. the CRC (16/14), the flags (8/6) or the inflated size (24/22)."""
    out = bytearray(raw)
    cd = raw.index(b"PK\x01\x02")
    out[cd + central:cd + central + len(value)] = value
    out[local:local + len(value)] = value
    return bytes(out)


def corrupt_deflate() -> bytes:
    raw = bytearray(zipped(VALID))
    raw[30 + len("predictions.csv")] |= 0b110  # the first deflate block header now says "block type 3": invalid
    return bytes(raw)


BAD_FILES = {
    # name: (file bytes, message pattern, row or None)
    "corrupt deflate": (corrupt_deflate, r"corrupt or truncated zip archive \(Error -3 while decompressing data: "
                                         r"invalid block type\)", None),
    "bad CRC": (lambda: patched(zipped(VALID), 16, 14, b"\0\0\0\0"),
                r"corrupt or truncated zip archive \(Bad CRC-32 for file 'predictions.csv'\)", None),
    "truncated zip": (lambda: zipped(VALID)[:60], r"corrupt or truncated zip archive \(File is not a zip file\)", None),
    # stored member whose sizes claim 400 bytes where 12 are: zipfile's EOFError has no message, its name is shown
    "member cut short": (lambda: patched(patched(zipped(VALID, zipfile.ZIP_STORED), 20, 18, SIZE_400), 24, 22,
                                         SIZE_400),
                         r"corrupt or truncated zip archive \(EOFError\)", None),
    "header lies about the size": (lambda: patched(zipped(b"0" * (8 << 20)), 24, 22, (14).to_bytes(4, "little")),
                                   r"corrupt or truncated zip archive \(Bad CRC-32", None),
    "zip bomb": (lambda: zipped(b"0" * (8 << 20)),
                 r"predictions.csv in the zip declares 8,388,608 bytes, more than a ranking of 2 probes x 3 gallery "
                 r"faces can take \(1,048,604 bytes at most\)", None),
    "encrypted member": (lambda: patched(zipped(VALID), 8, 6, b"\x01"),
                         "predictions.csv in the zip is encrypted", None),
    "bzip2 member": (lambda: zipped(VALID, zipfile.ZIP_BZIP2),
                     "predictions.csv in the zip is compressed with bzip2; only deflate or stored", None),
    "two members of the name": (lambda: zipped(VALID, names=("predictions.csv", "predictions.csv")),
                                "zip holds 2 members named predictions.csv", None),
    "no predictions.csv": (lambda: zipped(VALID, names=("sub/predictions.csv",)),
                           r"zip has no predictions.csv at its root \(holds \['sub/predictions.csv'\]\)", None),
    "not really a zip": (lambda: b"PK\x03\x04" + bytes(range(256)) * 4,
                         r"corrupt or truncated zip archive \(File is not a zip file\)", None),
    "random binary": (lambda: np.random.default_rng(0).bytes(3000), "row 1 holds the non-ASCII byte 0x", 1),
    "binary after a good row": (lambda: b"1,0,2\n2,0,\x89\n", "row 2 holds the non-ASCII byte 0x89: not a text file",
                                2),
    "binary, CR line ends": (lambda: b"1,0,2\r2,0,\x89\r", "row 2 holds the non-ASCII byte 0x89: not a text file", 2),
    "empty file": (lambda: b"", r"is empty: expected one row per probe \(2\)", None),
    "blank lines only": (lambda: b"\r\n\n", r"is empty: expected one row per probe \(2\)", None),
    "25-digit cell": (lambda: b"1,0,2\n2,0,1234567890123456789012345\n",
                      r"row 2 holds '1234567890123456789012345', which is not a gallery index \(0..2\)", 2),
    "25-digit first cell": (lambda: b"1234567890123456789012345,0,2\n2,0,1\n",
                            r"row 1 holds '1234567890123456789012345', which is not a gallery index \(0..2\)", 1),
    "5000-digit cell": (lambda: b"1,0,2\n2,0," + b"7" * 5000 + b"\n",
                        r"row 2 holds '7{25}\.\.\.' \(5000 digits\), which is not a gallery index", 2),
    # row 1 is valid (leading zeros are read as numbers are); the bad row 2 sends it through the slow path
    "5000 zeros": (lambda: b"2," + b"0" * 5000 + b",1\n1,1,1\n", r"row 2 is not a permutation", 2),
    "a file separator only": (lambda: b"\x1c", r"row 1 holds a header or text: '\\x1c'", 1),
    "form feed inside a row": (lambda: b"1,0,2\n2,0\x0c1\n", r"row 2 holds a non-integer cell: '0\\x0c1'", 2),
    "index past the gallery": (lambda: b"1,0,2\n2,0,3\n", r"row 2 holds '3', which is not a gallery index \(0..2\)", 2),
    "NUL bytes": (lambda: b"1,0,2\n\0\0\0\n", r"row 2 holds a non-integer cell: '\\x00\\x00\\x00'", 2),
    "plain file too large": (lambda: b"1,0,2\n" * 200_000,
                             r"is 1,200,000 bytes, more than a ranking of 2 probes x 3 gallery faces can take", None),
}


@pytest.mark.parametrize("kind", BAD_FILES)
def test_any_bad_predictions_file_is_an_input_error(tmp_path, kind):
    make, message, row = BAD_FILES[kind]
    path = tmp_path / ("sub.zip" if kind != "plain file too large" else "predictions.csv")
    path.write_bytes(make())
    with pytest.raises(KinretInputError, match=message) as info:
        read_predictions(path, 2, 3)
    assert info.value.path == str(path) and info.value.line == row


@pytest.mark.parametrize("kind", BAD_FILES)
def test_evaluate_exits_2_on_any_bad_predictions_file(truth, capsys, kind):
    make, message, row = BAD_FILES[kind]
    path = truth / "sub.zip"
    path.write_bytes(make())
    code = evaluate_main(["--predictions", str(path), "--probes", str(truth / "probe_list.csv"),
                          "--gallery", str(truth / "gallery_list.csv")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err  # one logged line
    assert f"{path}, line {row}: " in err if row else f"{path}: " in err
    assert re.search(message, err)


def test_valid_variants_still_read(tmp_path):
    expected = np.array([[1, 0, 2], [2, 0, 1]])
    for name, data in {"cr.csv": b"1,0,2\r2,0,1", "crlf.csv": b"1,0,2\r\n2,0,1\r\n", "zeros.csv": b"01,0,2\n2,000,1\n",
                       "stored.zip": zipped(VALID, zipfile.ZIP_STORED), "deflated.zip": zipped(VALID)}.items():
        (tmp_path / name).write_bytes(data)
        np.testing.assert_array_equal(read_predictions(tmp_path / name, 2, 3), expected, err_msg=name)


def test_bounded_reader_stops_at_the_limit_whatever_the_stream_claims():
    from kinret.submission.predictions import read_at_most

    class Endless(io.RawIOBase):  # a member that inflates forever, whatever its header said
        def __init__(self):
            self.served = 0

        def read(self, n=-1):
            n = 1 << 20 if n is None or n < 0 else n
            self.served += n
            return b"0" * n

    stream = Endless()
    assert read_at_most(stream, 5 << 20, chunk=1 << 16) is None
    assert stream.served <= (5 << 20) + (1 << 16)  # never more than one chunk past the limit
    assert read_at_most(io.BytesIO(b"0123456789"), 10, chunk=3) == b"0123456789"
    assert read_at_most(io.BytesIO(b"0123456789"), 9, chunk=3) is None


def test_size_limit_fits_the_real_test_split_and_the_organisers_large_gallery():
    from kinret.submission.predictions import max_predictions_bytes

    for n_probes, n_gallery in ((190, 3897), (190, 31787)):
        ranking = np.stack([np.random.default_rng(i).permutation(n_gallery) for i in range(n_probes)])
        from kinret.submission.predictions import format_predictions

        size = len(format_predictions(ranking)) + n_probes  # CRLF line ends add one byte per row
        assert size <= max_predictions_bytes(n_probes, n_gallery) <= 3 * size + (1 << 20)


def test_mutated_predictions_never_crash(tmp_path):
    # seeded fuzzing: flipped, dropped and inserted bytes in a CSV and its zip; a reader either returns a valid
    # ranking or raises KinretInputError, never zlib.error, OverflowError, UnicodeDecodeError, ...
    ranking = rank_gallery(np.random.default_rng(1).normal(size=(4, 12)))
    write_predictions(ranking, tmp_path / "p.csv", tmp_path / "p.zip")
    rng = np.random.default_rng(2)
    for source in ("p.csv", "p.zip"):
        raw = (tmp_path / source).read_bytes()
        for trial in range(300):
            (tmp_path / "m").write_bytes(mutate(raw, rng, 40))
            try:
                got = read_predictions(tmp_path / "m", 4, 12)
            except KinretInputError:
                continue
            assert got.shape == (4, 12) and (np.sort(got, axis=1) == np.arange(12)).all(), (source, trial)
