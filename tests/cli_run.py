"""The tests' way to run a command: `idaa.cli.main` in-process, with its exit code and captured output."""

from idaa.cli import main


def run(argv, capsys):
    """(exit code, stdout, stderr) of `idaa ARGV`; argparse's own rejections exit 2 through SystemExit."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err
