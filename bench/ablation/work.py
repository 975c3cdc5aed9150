# The "python3" workload: dicts, lists, strings, classes and a few threads.
import json
import threading


class Node:
    __slots__ = ("key", "children")

    def __init__(self, key):
        self.key = key
        self.children = []


def build(n):
    root = Node(0)
    nodes = [root]
    for i in range(1, n):
        node = Node(i)
        nodes[(i * 7919) % len(nodes)].children.append(node)
        nodes.append(node)
    return root


def walk(node):
    total = node.key
    for c in node.children:
        total += walk(c)
    return total


def job(out, i):
    data = {f"k{j}": [j, str(j), {"v": j * i}] for j in range(20000)}
    text = json.dumps(data)
    out[i] = len(json.loads(text)) + walk(build(20000))


out = {}
threads = [threading.Thread(target=job, args=(out, i)) for i in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(sum(out.values()))
