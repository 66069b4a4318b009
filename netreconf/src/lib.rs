//! vnetd: the site gateway router (issue 6, in progress).
