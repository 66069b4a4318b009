//! Destination-side content index, peer page server and Redis index client (not built yet: see issue 5).
