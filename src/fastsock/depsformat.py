"""Text forms of a dependency tree: an indented tree, JSON, Graphviz dot, Mermaid.

In the tree, ``<--`` lines are inbound edges (a client that connected to the
node) and ``-->`` lines are outbound edges (a server the node connected to).
In dot and Mermaid, every arrow points from client to server.
"""

import json

from fastsock.addresses import format_endpoint
from fastsock.depgraph import DependencyTree, Edge, Node, TreeNode

FORMATS = ("tree", "json", "dot", "mermaid")

# Pids shown in a node's label before the rest are counted as "+N".
MAX_LABEL_PIDS = 3


def render(tree: DependencyTree, fmt: str) -> str:
    """Return tree in format fmt: tree, json, dot or mermaid."""
    renderers = {
        "tree": render_tree,
        "json": render_json,
        "dot": render_dot,
        "mermaid": render_mermaid,
    }
    if fmt not in renderers:
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    return renderers[fmt](tree)


def node_label(node: Node, pids: list[int], show_host: bool) -> str:
    """Return a one-line name for node: comm and pids, or the peer address."""
    if not node.is_process:
        return f"{node.address} (not in the data)"

    if not node.has_process:
        label = "(no process)"
        if node.endpoint is not None:
            label += f" at {node.endpoint}"
    else:
        label = node.comm or node.service
        if pids:
            shown = ", ".join(str(pid) for pid in pids[:MAX_LABEL_PIDS])
            more = len(pids) - MAX_LABEL_PIDS
            noun = "pid" if len(pids) == 1 else "pids"
            label += f" ({noun} {shown}{f', +{more}' if more > 0 else ''})"
    if show_host and node.host is not None:
        label += f" on {node.host}"
    return label


def render_tree(tree: DependencyTree) -> str:
    """Return the tree as indented text, one root after another."""
    show_host = len(tree.hosts) > 1
    lines = []
    for root in tree.roots:
        lines.append(node_label(root.node, root.pids, show_host))
        lines.extend(_branch_lines(root, "", show_host))
        lines.append("")
    if not tree.roots:
        lines.append("no services in the flows of this window")
    return "\n".join(lines).rstrip("\n") + "\n"


def _branch_lines(tree_node: TreeNode, indent: str, show_host: bool) -> list[str]:
    entries = [("<--", branch) for branch in tree_node.inbound]
    entries += [("-->", branch) for branch in tree_node.outbound]
    entries += [("---", unknown) for unknown in tree_node.unknown]

    lines = []
    for index, (arrow, entry) in enumerate(entries):
        last = index == len(entries) - 1
        branch_mark = "└── " if last else "├── "
        child_indent = indent + ("    " if last else "│   ")
        if arrow == "---":
            lines.append(indent + branch_mark + _unknown_text(entry))
            continue

        peer = entry.peer
        text = f"{arrow} {node_label(peer.node, peer.pids, show_host)}"
        text += f"  {_edge_text(entry.edge, arrow)}"
        if peer.repeated:
            text += "  (cycle, shown above)"
        lines.append(indent + branch_mark + text)
        lines.extend(_branch_lines(peer, child_indent, show_host))
    return lines


def _edge_text(edge: Edge, arrow: str) -> str:
    server = format_endpoint(edge.server_addr, edge.server_port)
    count = edge.connections
    noun = "connection" if count == 1 else "connections"
    if arrow == "<--":
        where = f"from {edge.client_addr} to {server}/{edge.protocol}"
    else:
        where = f"at {server}/{edge.protocol}"
    return f"{where}, {count} {noun}, at most {edge.max_concurrent} at once"


def _unknown_text(entry: dict) -> str:
    return (
        f"--- direction unknown: {entry['local']} and {entry['remote']}"
        f"/{entry['protocol']}, {entry['connections']} connections"
    )


def render_json(tree: DependencyTree) -> str:
    """Return the tree as a JSON document (see tree_to_dict)."""
    return json.dumps(tree_to_dict(tree), indent=2) + "\n"


def tree_to_dict(tree: DependencyTree) -> dict:
    """Return the tree as plain data: the request and one nested tree per root."""
    return {
        "since": tree.since.isoformat() if tree.since else None,
        "until": tree.until.isoformat() if tree.until else None,
        "depth": tree.depth,
        "direction": tree.direction,
        "roots": [_tree_node_dict(root) for root in tree.roots],
    }


def _tree_node_dict(tree_node: TreeNode) -> dict:
    result = {"node": _node_dict(tree_node.node, tree_node.pids)}
    if tree_node.repeated:
        result["repeated"] = True
    result["inbound"] = [
        {"edge": _edge_dict(branch.edge), "peer": _tree_node_dict(branch.peer)}
        for branch in tree_node.inbound
    ]
    result["outbound"] = [
        {"edge": _edge_dict(branch.edge), "peer": _tree_node_dict(branch.peer)}
        for branch in tree_node.outbound
    ]
    if tree_node.unknown:
        result["unknown"] = tree_node.unknown
    return result


def _node_dict(node: Node, pids: list[int]) -> dict:
    if not node.is_process:
        return {"kind": "address", "address": node.address}
    return {
        "kind": "process",
        "host": node.host,
        "netns": node.netns,
        "comm": node.comm,
        "service": node.service,
        "endpoint": node.endpoint,
        "pids": pids,
    }


def _edge_dict(edge: Edge) -> dict:
    return {
        "protocol": edge.protocol,
        "server_addr": edge.server_addr,
        "server_port": edge.server_port,
        "client_addr": edge.client_addr,
        "connections": edge.connections,
        "client_connections": edge.client_connections,
        "server_connections": edge.server_connections,
        "max_concurrent": edge.max_concurrent,
        "first_seen": edge.first_seen.isoformat() if edge.first_seen else None,
        "last_seen": edge.last_seen.isoformat() if edge.last_seen else None,
    }


def graph_parts(tree: DependencyTree) -> tuple[dict[Node, str], list[Edge]]:
    """Return the nodes (with labels) and the distinct edges that the tree shows."""
    show_host = len(tree.hosts) > 1
    labels: dict[Node, str] = {}
    edges: dict[tuple, Edge] = {}

    def visit(tree_node: TreeNode) -> None:
        labels.setdefault(
            tree_node.node, node_label(tree_node.node, tree_node.pids, show_host)
        )
        for branch in (*tree_node.inbound, *tree_node.outbound):
            edges.setdefault(branch.edge.key, branch.edge)
            visit(branch.peer)

    for root in tree.roots:
        visit(root)
    return labels, list(edges.values())


def render_dot(tree: DependencyTree) -> str:
    """Return the edges of the tree as a Graphviz digraph, client to server."""
    labels, edges = graph_parts(tree)
    ids = {node: f"n{index}" for index, node in enumerate(labels)}
    lines = ["digraph dependencies {", "  rankdir=LR;", "  node [shape=box];"]
    for node, label in labels.items():
        lines.append(f"  {ids[node]} [label={_dot_string(label)}];")
    for edge in edges:
        label = _graph_edge_label(edge)
        lines.append(
            f"  {ids[edge.client]} -> {ids[edge.server]} [label={_dot_string(label)}];"
        )
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_mermaid(tree: DependencyTree) -> str:
    """Return the edges of the tree as a Mermaid flowchart, client to server."""
    labels, edges = graph_parts(tree)
    ids = {node: f"n{index}" for index, node in enumerate(labels)}
    lines = ["flowchart LR"]
    for node, label in labels.items():
        lines.append(f"  {ids[node]}[{_mermaid_string(label)}]")
    for edge in edges:
        label = _mermaid_string(_graph_edge_label(edge))
        lines.append(f"  {ids[edge.client]} -->|{label}| {ids[edge.server]}")
    return "\n".join(lines) + "\n"


def _graph_edge_label(edge: Edge) -> str:
    server = format_endpoint(edge.server_addr, edge.server_port)
    return f"{edge.protocol} {server}: {edge.connections} conn."


def _dot_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _mermaid_string(text: str) -> str:
    # Mermaid reads a quoted label as text; a quote inside is the entity #quot;.
    return '"' + text.replace('"', "#quot;") + '"'
