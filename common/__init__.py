"""The floor below every room: what data/, models/, engine/ and scripts/ all share."""
