"""Evaluation metrics: pure functions with exact definitions (docs/evaluation.md).

- `reward_model`: a judge's scores against human ranks or against a reference judge's scores;
- `winrate`: head-to-head win/tie/loss with seeded percentile-bootstrap intervals;
- `alpaca`: AlpacaEval-format outputs, win rate against reference outputs and a
  length-controlled win rate (our implementation of Dubois et al. 2024).
"""
