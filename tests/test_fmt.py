from vitlab import fmt


def test_numbers_read_as_a_person_reads_them():
    assert fmt.pct(0.9191, 0.882, 0.948) == "91.9% [88.2, 94.8]" and fmt.pct(0.5) == "50.0%"
    assert fmt.pt(-0.002, -0.011, 0.006) == "-0.2 pt [-1.1, +0.6]"
    assert [fmt.ms(x) for x in (0.2901, 1.127, 43.04, 287.4, 1234.5)] == [
        "0.290 ms", "1.13 ms", "43.0 ms", "287 ms", "1,234 ms"]
    assert [fmt.mb(x) for x in (157.23, 1.54, 0.0681)] == ["157.2 MB", "1.5 MB", "0.068 MB"]
    assert fmt.rate(3867.2) == "3,867 img/s" and fmt.ratio(1.6234) == "1.62x"
    assert fmt.pct(None) == fmt.ms(float("nan")) == "–"
