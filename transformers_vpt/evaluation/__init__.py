"""Scoring for the VPT evaluation: the upstream LLM judge and judge-free metrics per dataset."""
