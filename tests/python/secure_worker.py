"""A third-party ots worker written from docs/PROTOCOL.md alone (§3, §5,
§15): pyzmq, msgpack, noiseprotocol and cryptography, no ots code.

It connects secured (Noise IK handshake, every message sealed), registers,
takes one task, streams a log line, uploads a JUnit result file and reports
the task finished, resending its mandatory messages until each is
acknowledged. Meanwhile it reads the server's signed heartbeats on the
events port (§15.4: Ed25519 key from the sealed welcome, beats only
forward and not stale); it exits 0 once everything is acknowledged and it
verified at least two heartbeats. Any deviation from the protocol (a
message that does not open, a refusal, a timeout, a broadcast that does
not verify) exits non-zero with the reason.

    python3 secure_worker.py CONTROL EVENTS SERVER_PUB_FILE WORKER_KEY_FILE NAME DEVICEGROUP
"""

import hashlib
import os
import sys
import time

import msgpack
import zmq
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from noise.connection import Keypair, NoiseConnection

MARKER = b"OTS-NOISE-IK-1"


def key_file(path, tag):
    # §15.1: one line, "<tag> <64 hex digits>"
    text = open(path).read().split()
    if len(text) != 2 or text[0] != tag:
        sys.exit(f"{path}: not an {tag} file")
    return bytes.fromhex(text[1])


class Sealed:
    """§15.3: frame 0 the message number, frame 1 the frames sealed once."""

    def __init__(self, send_key, recv_key, h):
        self.send, self.recv, self.h = ChaCha20Poly1305(send_key), ChaCha20Poly1305(recv_key), h
        self.next_send, self.last_recv = 1, 0

    def seal(self, frames):
        n = self.next_send
        self.next_send += 1
        plain = b"".join(len(f).to_bytes(4, "big") + f for f in frames)
        nb = n.to_bytes(8, "big")
        return [nb, self.send.encrypt(bytes(4) + nb, plain, self.h + nb)]

    def open(self, frames):
        if len(frames) != 2 or len(frames[0]) != 8:
            sys.exit(f"a sealed message has 2 frames, got {len(frames)}")
        n = int.from_bytes(frames[0], "big")
        if n <= self.last_recv:
            sys.exit(f"replayed message number {n}")
        nb = frames[0]
        plain = self.recv.decrypt(bytes(4) + nb, frames[1], self.h + nb)
        self.last_recv = n
        out, i = [], 0
        while i < len(plain):
            size = int.from_bytes(plain[i : i + 4], "big")
            out.append(plain[i + 4 : i + 4 + size])
            i += 4 + size
        return out


class Broadcasts:
    """§15.4: [topic, header, body, beat(8) + Ed25519 signature(64)]."""

    def __init__(self, welcome):
        self.key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(welcome["events_key"]))
        self.anchor_beat, self.anchor = welcome["beat"], time.monotonic()
        self.interval = max(welcome["heartbeat_ms"], 10) / 1000
        self.liveness = max(welcome["liveness"], 2)
        self.last = welcome["beat"] - 1

    def open(self, frames):
        """The decoded body, or None if this is not a sign of life."""
        if len(frames) != 4 or len(frames[3]) != 72:
            return None
        header, body, sig = frames[1], frames[2], frames[3]
        beat = int.from_bytes(sig[:8], "big")
        expected = self.anchor_beat + int((time.monotonic() - self.anchor) / self.interval)
        if beat <= self.last or beat + self.liveness < expected:
            return None  # replayed, or held back and released late
        signed = (b"OTS-EVENTS-1" + sig[:8] + len(header).to_bytes(4, "big") + header
                  + len(body).to_bytes(4, "big") + body)
        try:
            self.key.verify(sig[8:], signed)
        except InvalidSignature:
            sys.exit("a broadcast on the events port does not verify")
        self.last = beat
        return msgpack.unpackb(body)


def main():
    control, events, server_pub, worker_key, name, group = sys.argv[1:7]
    server_pub = key_file(server_pub, "ots-x25519-public")
    private = key_file(worker_key, "ots-x25519-private")

    ctx = zmq.Context()
    d = ctx.socket(zmq.DEALER)
    d.setsockopt(zmq.IDENTITY, os.urandom(16))
    d.setsockopt(zmq.LINGER, 0)
    d.setsockopt(zmq.RECONNECT_IVL, -1)
    d.connect(control)
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"hb")
    sub.connect(events)
    broadcasts = None
    heartbeats = 0

    # §15.2: Noise IK, the server's key pinned.
    noise = NoiseConnection.from_name(b"Noise_IK_25519_ChaChaPoly_BLAKE2s")
    noise.set_as_initiator()
    noise.set_keypair_from_private_bytes(Keypair.STATIC, private)
    noise.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, server_pub)
    noise.start_handshake()
    d.send_multipart([MARKER, noise.write_message()])
    if not d.poll(10000):
        sys.exit("no handshake answer within 10 s")
    answer = d.recv_multipart()
    if answer[0] != MARKER:
        sys.exit(f"handshake refused: {[msgpack.unpackb(f) for f in answer]}")
    identity = msgpack.unpackb(noise.read_message(answer[1]))
    print("handshake done; the server takes us for", identity, flush=True)
    ch = Sealed(
        noise.noise_protocol.cipher_state_encrypt.k,
        noise.noise_protocol.cipher_state_decrypt.k,
        noise.get_handshake_hash(),
    )

    def send(body, cls="control", mandatory=False, seq=0, task=None, raw=None):
        header = {"v": 1, "class": cls, "mandatory": mandatory, "seq": seq, "task": task}
        frames = [msgpack.packb(header), msgpack.packb(body)]
        if raw is not None:
            frames.append(raw)
        d.send_multipart(ch.seal(frames))

    poller = zmq.Poller()
    poller.register(d, zmq.POLLIN)
    poller.register(sub, zmq.POLLIN)

    def recv(timeout_ms):
        nonlocal heartbeats
        ready = dict(poller.poll(timeout_ms))
        if sub in ready:
            frames = sub.recv_multipart()
            got = broadcasts.open(frames) if broadcasts else None
            if got is not None and got["type"] == "server_heartbeat":
                heartbeats += 1
                print("verified heartbeat beat", int.from_bytes(frames[3][:8], "big"), flush=True)
        if d not in ready:
            return None, None
        frames = ch.open(d.recv_multipart())
        return msgpack.unpackb(frames[0]), msgpack.unpackb(frames[1])

    hello = {
        "type": "hello",
        "worker": name,
        "session": os.urandom(8).hex(),
        "device": {"devicegroup": group},
        "running": [],
    }
    send(hello)
    deadline = time.monotonic() + 30
    pending = {}  # seq -> (body, cls, task, raw): our outbox (§4.1)
    next_seq = 1
    registered = False
    task = None
    reported = False
    offered_at = None
    last_send = time.monotonic()
    while time.monotonic() < deadline:
        if reported and not pending and heartbeats >= 2:
            print("done", flush=True)
            return 0
        header, body = recv(200)
        now = time.monotonic()
        if body is None:
            if not registered and now - last_send > 1:
                send(hello)
                last_send = now
            for seq, (b, cls, t, raw) in pending.items():
                if now - last_send > 1:
                    send(b, cls, True, seq, t, raw)
            if pending and now - last_send > 1:
                last_send = now
            if offered_at is not None and now - offered_at > 1:
                send(offer, "file", task=task)  # unanswered: offer again
                offered_at = now
            if registered and task is None and now - last_send > 1:
                send({"type": "ready"})
                last_send = now
            continue
        kind = body["type"]
        if kind == "error":
            sys.exit(f"the server answered error: {body}")
        if kind == "welcome" and not registered:
            registered = True
            broadcasts = Broadcasts(body)
            print("registered", flush=True)
            send({"type": "ready"})
        elif kind == "dispatch":
            send({"type": "ack", "seq": header["seq"]})
            spec = body["spec"]
            if task is not None:
                continue  # a resend of the dispatch we run
            task, attempt = spec["task"], spec["attempt"]
            print("running", task, flush=True)
            junit = b'<testsuite name="py"><testcase name="from_python"/></testsuite>'
            digest = hashlib.sha256(junit).hexdigest()
            accepted = {"type": "task_accepted", "task": task, "attempt": attempt}
            pending[next_seq] = (accepted, "control", task, None)
            send(accepted, "control", True, next_seq, task)
            next_seq += 1
            line = {"seq": 1, "stream": "stdout", "text": "hello from a python worker"}
            send({"type": "log", "task": task, "attempt": attempt, "lines": [line]}, "log", task=task)
            # §4.2.1: lines 2 and 3 packed, in the stored form (a
            # backslash written twice), one part per stream.
            out = "packed from python \\\\ ok\n".encode()
            err = "packed on stderr\n".encode()
            parts = [{"first": 2, "count": 1, "stream": "stdout", "bytes": len(out)},
                     {"first": 3, "count": 1, "stream": "stderr", "bytes": len(err)}]
            send({"type": "log_packed", "task": task, "attempt": attempt, "parts": parts},
                 "log", task=task, raw=out + err)
            # §7.7: offer the result file; the server answers with credit.
            offer = {"type": "file_offer", "task": task, "attempt": attempt,
                     "name": "results.xml", "size": len(junit)}
            send(offer, "file", task=task)
            offered_at = time.monotonic()
            last_send = offered_at
        elif kind == "file_credit" and body["name"] == "results.xml":
            have, until = body["have"], body["until"]
            if body["resume"] or have < len(junit):
                end = min(until, len(junit))
                if end > have:
                    chunk = {"type": "file_chunk", "task": task, "attempt": attempt,
                             "name": "results.xml", "offset": have}
                    send(chunk, "file", task=task, raw=junit[have:end])
                if end == len(junit):
                    send({"type": "file_end", "task": task, "attempt": attempt, "name": "results.xml",
                          "size": len(junit), "sha256": digest}, "file", task=task)
            offered_at = None
        elif kind == "file_refused":
            sys.exit(f"the server refused the result file: {body}")
        elif kind == "file_stored" and body["name"] == "results.xml" and not reported:
            reported = True
            report = {
                "type": "task_finished",
                "task": task,
                "attempt": attempt,
                "outcome": {"exit_code": 0, "timed_out": False, "cancelled": False},
                "log_lines": 3,
                "files": [{"name": "results.xml", "size": len(junit), "sha256": digest}],
            }
            pending[next_seq] = (report, "control", task, None)
            send(report, "control", True, next_seq, task)
            next_seq += 1
            last_send = time.monotonic()
        elif kind == "ack":
            pending.pop(body["seq"], None)
            if reported and not pending:
                print("all acknowledged", flush=True)
        if offered_at is not None and time.monotonic() - offered_at > 1:
            send(offer, "file", task=task)  # unanswered: offer again
            offered_at = time.monotonic()
    sys.exit(f"not done within 30 s (registered={registered}, task={task}, pending={sorted(pending)}, heartbeats={heartbeats})")


if __name__ == "__main__":
    sys.exit(main())
