#!/usr/bin/env python3
"""Compares the assertions of two commits: every assert!/assert_eq!/assert_ne!,
matches! and .expect_err( in src/ and tests/, whitespace-normalized, as two
multisets. A refactor that keeps behaviour should only rename what the
assertions reach, never what they expect; this lists what went and what came.

    python3 scripts/assert-diff.py <before-rev> [<after-rev, default HEAD>]
"""
import re,sys,subprocess,collections
def files(rev):
    out=subprocess.run(['git','ls-tree','-r','--name-only',rev,'src','tests'],capture_output=True,text=True).stdout.split()
    return [f for f in out if f.endswith('.rs')]
def asserts(rev):
    c=collections.Counter()
    for f in files(rev):
        t=subprocess.run(['git','show',f'{rev}:{f}'],capture_output=True,text=True).stdout
        t=re.sub(r'\s+',' ',t)
        for m in re.finditer(r'(assert(?:_eq|_ne)?!\s*\(|\.expect_err\(|matches!\s*\()',t):
            s=m.start(); depth=0; i=t.index('(',s)
            j=i
            while j<len(t):
                if t[j]=='(': depth+=1
                elif t[j]==')':
                    depth-=1
                    if depth==0: break
                j+=1
            c[t[s:j+1]]+=1
    return c
a=asserts(sys.argv[1]); b=asserts(sys.argv[2] if len(sys.argv) > 2 else "HEAD")
print("before",sum(a.values()),"after",sum(b.values()))
for k in sorted((a-b).keys()): print("-",(a-b)[k],k[:230])
print('----')
for k in sorted((b-a).keys()): print("+",(b-a)[k],k[:230])
