//! Guest pull tests (filled below).
