"""Model implementations (one Llama-family implementation) and weight loading."""
