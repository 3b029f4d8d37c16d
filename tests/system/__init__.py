"""System tests: buildq as real processes (the daemon, the command, the status page, the\ndemo), against real Buildbot, Chromium and systemd, and under chaos."""
