"""Memory-safe supervisor for a pool of CHAT alignment workers."""
