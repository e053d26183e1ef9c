"""Datasets: readers for ISIC 2018, BUSI and GlaS, and the synthetic lesion set."""
