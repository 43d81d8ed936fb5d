"""Evaluation harness: tasks, metrics, a resumable runner and its reports."""
