"""Run the CLI in-process as a user would, for tests."""

from mishield.cli import main


def run_cli(argv, capsys):
    """Return (exit code, stdout, stderr) of `mishield ARGV`."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exit_:
        code = exit_.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err
