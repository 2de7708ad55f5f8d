//! A member list written as text, for configuration by environment or
//! command line.

use crate::{GroupError, NodeId};

/// Parses a member list written `ID=ADDRESS,ID=ADDRESS,…` (spaces around
/// the parts are ignored), the form the example `peer_group` reads from
/// `PEERS`, into what [`PeerGroupBuilder::peers`](crate::PeerGroupBuilder::peers)
/// and [`PeerGroup::set_members`](crate::PeerGroup::set_members) take.
///
/// An entry without `=`, an id that is not a number, an empty address or
/// an id listed twice is a [`GroupError::Config`].
///
/// ```
/// let members = leaseholder_raft::parse_members("1=127.0.0.1:7101, 2=127.0.0.1:7102")?;
/// assert_eq!(members, vec![(1, "127.0.0.1:7101".to_owned()), (2, "127.0.0.1:7102".to_owned())]);
/// assert!(leaseholder_raft::parse_members("1=a,1=b").is_err());
/// # Ok::<(), leaseholder_raft::GroupError>(())
/// ```
pub fn parse_members(text: &str) -> Result<Vec<(NodeId, String)>, GroupError> {
    let mut members: Vec<(NodeId, String)> = Vec::new();
    for entry in text.split(',') {
        let (id, addr) = entry.split_once('=').ok_or_else(|| {
            GroupError::Config(format!("member entry {entry:?} is not ID=ADDRESS"))
        })?;
        let id: NodeId = id.trim().parse().map_err(|_| {
            GroupError::Config(format!("member entry {entry:?}: the id is not a number"))
        })?;
        let addr = addr.trim();
        if addr.is_empty() {
            return Err(GroupError::Config(format!(
                "member entry {entry:?}: the address is empty"
            )));
        }
        if members.iter().any(|(m, _)| *m == id) {
            return Err(GroupError::Config(format!("member {id} is listed twice")));
        }
        members.push((id, addr.to_owned()));
    }
    Ok(members)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_entries_are_config_errors() {
        for bad in ["", "1", "x=a", "1=", "1=a,,2=b", "1=a,1=b"] {
            assert!(
                matches!(parse_members(bad), Err(GroupError::Config(_))),
                "{bad:?}"
            );
        }
        assert_eq!(
            parse_members(" 3 = h:1 ").ok(),
            Some(vec![(3, "h:1".to_owned())])
        );
    }
}
