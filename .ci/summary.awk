# The test run in one line: how many ran, failed and were skipped, and why each group was
# skipped. Reads `cargo test`'s output: its `test result:` lines (one per test binary, the
# doc-tests last) and the `test NAME ... ignored, REASON` line of every test whose suite could
# not run here.
#
#   cargo test 2>&1 | tee /dev/stderr | awk -f .ci/summary.awk
/^test result:/ { passed += $4; failed += $6; ignored += $8 }
/^test .* \.\.\. ignored, / { sub(/^.* \.\.\. ignored, /, ""); why[$0]++ }
END {
    line = sprintf("%d passed, %d failed, %d skipped", passed, failed, ignored)
    sep = " ("
    for (reason in why) { line = line sep why[reason] ": " reason; sep = "; " }
    if (sep == "; ") line = line ")"
    print line
}
