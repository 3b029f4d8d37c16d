"""What buildq ships for testing runners, built in or from a plugin (needs pytest).

``conformance`` holds the contract checks as plain functions; ``suite.RunnerConformance`` runs
them all as a pytest class: subclass it in your plugin's tests and give it a runner::

    from buildq.testing import RunnerConformance

    class TestMyRunner(RunnerConformance):
        @pytest.fixture
        def runner(self): return MyRunner(...)

        @pytest.fixture
        def finish(self, runner): return lambda build_id: ...  # make the build terminal
"""

from buildq.testing.suite import RunnerConformance

__all__ = ["RunnerConformance"]
