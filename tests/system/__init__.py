"""System tests: the ``buildq`` command and ``buildq.demo`` as real processes."""
