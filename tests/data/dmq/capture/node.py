import socket, sys, time, os, random
KAM=("127.0.0.1",5070); ME=("127.0.0.1",5071)
out=sys.argv[1]; os.makedirs(out,exist_ok=True)
s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.bind(ME); s.settimeout(0.3)
n=[0]
def save(tag,data):
    n[0]+=1; open(f"{out}/{n[0]:03d}-{tag}.sip","wb").write(data)
def hdrs(msg):
    head=msg.split(b"\r\n\r\n",1)[0].split(b"\r\n")
    return head
def respond(msg):
    lines=hdrs(msg); r=[b"SIP/2.0 200 OK"]
    for l in lines[1:]:
        k=l.split(b":",1)[0].strip().lower()
        if k in (b"via",b"v",b"from",b"f",b"call-id",b"i",b"cseq"): r.append(l)
        if k in (b"to",b"t"): r.append(l+b";tag=kaping1")
    r.append(b"Content-Length: 0"); 
    return b"\r\n".join(r)+b"\r\n\r\n"
def pump(secs):
    end=time.time()+secs
    while time.time()<end:
        try: d,a=s.recvfrom(70000)
        except socket.timeout: continue
        first=d.split(b"\r\n",1)[0]
        if d.startswith(b"SIP/2.0"):
            save("resp",d)
        else:
            user=first.split(b" ")[1].split(b"@")[0].split(b":")[1].decode() if b"@" in first else "x"
            save("req-"+user,d)
            rsp=respond(d); save("our200",rsp); s.sendto(rsp,a)
def req(chan,body,ct=b"application/json",mf=1):
    br="z9hG4bK"+str(random.randint(1,1<<30))
    m=(f"KDMQ sip:{chan}@127.0.0.1:5070 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5071;branch={br}\r\n"
       f"From: <sip:{chan}@127.0.0.1:5071>;tag={random.randint(1,1<<30)}\r\nTo: <sip:{chan}@127.0.0.1:5070>\r\n"
       f"Call-ID: {random.randint(1,1<<40)}@127.0.0.1\r\nCSeq: 10 KDMQ\r\nMax-Forwards: {mf}\r\n"
       f"Content-Type: {ct.decode()}\r\nContent-Length: {len(body)}\r\n\r\n").encode()+body
    save("ours-"+chan,m); s.sendto(m,KAM)
def reg(i,exp):
    r=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); r.bind(("127.0.0.1",0)); p=r.getsockname()[1]
    m=(f"REGISTER sip:127.0.0.1:5070 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{p};branch=z9hG4bKr{i}x{exp}\r\n"
       f"From: <sip:u{i}@127.0.0.1>;tag=f{i}\r\nTo: <sip:u{i}@127.0.0.1>\r\nCall-ID: reg{i}@t\r\nCSeq: {2 if exp==0 else 1} REGISTER\r\n"
       f"Contact: <sip:u{i}@127.0.0.1:{40000+i}>\r\nExpires: {exp}\r\nMax-Forwards: 70\r\nUser-Agent: capture\r\nContent-Length: 0\r\n\r\n").encode()
    r.sendto(m,KAM); r.settimeout(1); print(r.recv(2000).split(b"\r\n")[0]); r.close()
phase=sys.argv[2]
pump(2)
if phase=="join":
    req("notification_peer",b"sip:127.0.0.1:5071;status=active\r\n",b"text/plain",2); pump(2)
    for i in range(3): reg(i,300)
    pump(1); reg(0,0); pump(1)
    req("usrloc",b'{"action":3}'); pump(2)
    for i in range(3,9): reg(i,300)
    pump(1)
    req("usrloc",b'{"action":3}'); pump(2)
if phase=="ping":
    req("notification_peer",b"sip:127.0.0.1:5071;status=active\r\n",b"text/plain",1); pump(1)
    req("dialog",b'{}'); pump(1)
    req("usrloc",b'{"action":3,'); pump(1)
    pump(int(sys.argv[3]))
