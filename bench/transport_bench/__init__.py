"""The transport benchmark's parts (bench/run.py runs them): plan, servers, measure, goals, report."""
