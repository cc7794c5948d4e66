"""The pass/fail bookkeeping of the end-to-end test scripts (tools/test_*.py): each check prints one line, and the
script ends with "NAME: N passed, M failed" and exit code 0 only when nothing failed."""


class Checks:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def __call__(self, name: str, cond: bool, detail: str = "") -> bool:
        """Records one check; prints 'ok   name' or 'FAIL name: detail'. Returns cond."""
        if cond:
            self.passed += 1
            print(f"ok   {name}", flush=True)
        else:
            self.failed += 1
            print(f"FAIL {name}: {detail}", flush=True)
        return bool(cond)

    def report(self, script: str) -> int:
        """Prints the summary line and returns the exit code."""
        print(f"{script}: {self.passed} passed, {self.failed} failed")
        return 0 if self.failed == 0 else 1
