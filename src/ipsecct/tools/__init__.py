"""Offline tools: pcap reading and writing, decrypting captures, Wireshark key files, a test PKI."""
