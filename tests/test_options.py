"""Every option is checked, by one validator shared by the command line and
the API (issue 10.7), and the same things have the same names in every
command."""
import pytest

import xlegacy
from xlegacy import options
from xlegacy.cli import build_parser, main

from conftest import load_sample

STREAM_COMMANDS = {
    "info": [],
    "restore": ["-o", "out.raw"],
    "verify": [],
    "translate": ["0x1000"],
}


def usage_error(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-1", "-3", "2.5", "x"])
@pytest.mark.parametrize("command", ["info", "restore", "translate"])
def test_checkpoint_must_be_a_positive_whole_number(capsys, command, value):
    err = usage_error(capsys, [command, "s.bin", *STREAM_COMMANDS[command],
                               f"--checkpoint={value}"])
    assert "argument --checkpoint" in err and value in err


@pytest.mark.parametrize("value", ["0", "-3", "1.5"])
def test_threads_must_be_a_positive_whole_number(capsys, value):
    err = usage_error(capsys, ["restore", "s.bin", "-o", "x.raw", f"--threads={value}"])
    assert "argument --threads" in err


@pytest.mark.parametrize("bad", [{"checkpoint": 0}, {"checkpoint": -1}, {"checkpoint": 2.5},
                                 {"checkpoint": True}, {"checkpoint": "2"}, {"threads": 0},
                                 {"threads": -3}, {"threads": 1.5}, {"width": 48},
                                 {"width": True}, {"guest": "HVM"}])
def test_api_rejects_bad_options_before_reading(bad):
    path, _ = load_sample("remus_compressed_3cp")
    with pytest.raises(ValueError) as exc:
        xlegacy.restore_result(str(path), **bad)
    assert next(iter(bad)) in str(exc.value)


def test_api_accepts_integer_likes():
    np = pytest.importorskip("numpy")
    assert options.checkpoint(np.int64(2)) == 2
    assert options.threads(None) is None and options.checkpoint(None) is None
    assert options.width(64) == 64 and options.guest("pv") == "pv"


def test_checkpoint_option_still_works():
    path, _ = load_sample("remus_compressed_3cp")
    assert len(xlegacy.restore_result(str(path), checkpoint=2, inspect_only=True)
               .checkpoints) == 2


@pytest.mark.parametrize("command", [*STREAM_COMMANDS, "convert"])
@pytest.mark.parametrize("spelling", [["-w", "64", "-g", "hvm"],
                                      ["--width", "64", "--guest", "hvm"],
                                      ["--width=64", "--guest-type=hvm"]])
def test_same_names_in_every_command(command, spelling):
    if command == "convert":
        argv = ["convert", "-i", "s.bin", "-o", "s.v2"]
        dest_w, dest_g = "twidth", "gtype"
    else:
        argv = [command, "s.bin", *STREAM_COMMANDS[command]]
        dest_w, dest_g = "width", "guest"
    args = build_parser(command).parse_args(argv + spelling)
    assert getattr(args, dest_w) == 64 and getattr(args, dest_g) == "hvm"


@pytest.mark.parametrize("command", [*STREAM_COMMANDS, "convert"])
def test_bad_width_and_guest_are_usage_errors(capsys, command):
    base = ["convert", "-i", "s.bin", "-o", "s.v2"] if command == "convert" else \
        [command, "s.bin", *STREAM_COMMANDS[command]]
    assert "width must be 32 or 64" in usage_error(capsys, base + ["-w", "48"])
    assert "guest must be 'pv' or 'hvm'" in usage_error(capsys, base + ["-g", "xen"])
