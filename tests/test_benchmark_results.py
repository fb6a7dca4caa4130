"""What neoxlab reads from lm-eval's results JSON (no lm-eval needed): the metrics it logs and
the model card's table."""

from neoxlab.benchmark_results import markdown_table, metric_values

RESULTS = {
    "results": {
        "stdlib": {
            "alias": "stdlib",
            "sample_len": 3,  # bookkeeping beside the metrics, not a metric
            "word_perplexity,none": 12345678.9,
            "word_perplexity_stderr,none": "N/A",  # lm-eval's mark of a missing stderr
            "bits_per_byte,none": 2.5,
        },
        "choice": {"acc,none": 0.5, "acc_stderr,none": 0.25},
    }
}


def test_only_metric_filter_keys_with_numbers_are_metrics():
    assert metric_values(RESULTS) == {
        "benchmarks/stdlib/word_perplexity": 12345678.9,
        "benchmarks/stdlib/bits_per_byte": 2.5,
        "benchmarks/choice/acc": 0.5,
        "benchmarks/choice/acc_stderr": 0.25,
    }


def test_model_card_table_shows_huge_perplexities_in_e_notation():
    assert markdown_table(RESULTS)[2:] == [
        "| choice | acc | 0.5000 | 0.2500 |",
        "| stdlib | bits_per_byte | 2.5000 |  |",
        "| stdlib | word_perplexity | 1.2346e+07 |  |",
    ]
