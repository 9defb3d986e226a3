"""RIN: Recurrent Interface Networks (Jabri, Fleet, Chen; ICML 2023)."""
