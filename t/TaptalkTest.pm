# t/TaptalkTest.pm: the mock TapTalk server and PostgreSQL nodes for the TAP tests.

=pod

=head1 NAME

TaptalkTest - the mock TapTalk server and PostgreSQL nodes for taptalk's TAP tests

=head1 SYNOPSIS

  use FindBin;
  use lib $FindBin::RealBin;
  use TaptalkTest;
  use Test::More;

  my $mock = TaptalkTest::Mock->start(tls => 1, second_port => 1);
  my $node = TaptalkTest::node('main', mock => $mock);
  TaptalkTest::run_regress($node, 'init', 'validation');

  my $mark = $mock->log_mark;
  $node->safe_psql('postgres', "SELECT taptalk_auth_ticket(...)");
  is($mock->count($mark, 'request'), 1, 'one request');

  done_testing();

=head1 DESCRIPTION

B<TaptalkTest::Mock> starts F<test/mock_taptalk.py> on ports that the
system chooses (C<--port 0>; the mock reports them on its ready line), so
two suites can run side by side.  The mock is stopped whatever happens: by
C<stop>, when the object goes away, in an END block, and by the mock itself
when the test process dies (C<--exit-on-eof>: it reads its standard input,
a pipe whose other end only this process holds).

B<TaptalkTest::node> makes a PostgreSQL::Test::Cluster node configured for
the mock, started, with the extension created in database C<postgres>.

B<TaptalkTest::run_regress> runs sql/*.sql files with pg_regress against a
node and compares them with expected/*.out.

=cut

package TaptalkTest;

use strict;
use warnings;

use Carp;
use Cwd qw(abs_path);
use File::Basename qw(dirname);
use File::Copy ();
use File::Path qw(make_path);
use IPC::Run;
use POSIX ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

# the repository's root (this file is t/TaptalkTest.pm)
our $ROOT = abs_path(dirname(abs_path(__FILE__)) . '/..');

# the mock's test credentials (not a real key)
our $KEY_ID     = 'test-key-id';
our $KEY_SECRET = 'test-key-secret-Zq8X';

our $PYTHON = $ENV{PYTHON} || 'python3';

# PostgreSQL::Test::Cluster runs $ENV{PG_REGRESS} in init(); make installcheck
# sets it, a plain "prove" may not.  The nodes' superuser is postgres, as the
# expected output of the sql files says, whoever runs the tests.
BEGIN
{
	$ENV{PGUSER} = 'postgres';
	if (!$ENV{PG_REGRESS})
	{
		my $pg_config = $ENV{PG_CONFIG} || 'pg_config';
		my $pkglibdir = `$pg_config --pkglibdir`;
		chomp $pkglibdir;
		$ENV{PG_REGRESS} = "$pkglibdir/pgxs/src/test/regress/pg_regress"
		  if $pkglibdir;
	}
}

=pod

=head1 FUNCTIONS

=over

=item TaptalkTest::node($name, %opts)

A new PostgreSQL::Test::Cluster node: initdb (superuser postgres, which
this module makes the default user with PGUSER; UTF8, C.UTF-8), then in
postgresql.conf C<shared_preload_libraries = 'taptalk'> (unless
C<< preload => 0 >>), C<max_connections = 60>, and with C<< mock => $mock >>
the settings that point at it: C<taptalk.base_url> (the mock's first port),
C<taptalk.server_key_id> and C<taptalk.server_key_secret> (the mock's test
key) and the custom settings the sql/*.sql files read: C<mock.port>,
C<mock.port2>, C<mock.tls_port>, C<mock.tls_dir>, C<mock.dir>, C<mock.log>.
With C<< key_file => $path >> the secret is written to C<$path> (mode 0600)
and C<taptalk.server_key_file> names it, as the README recommends, instead
of C<taptalk.server_key_secret>.
C<< conf => "lines" >> is appended last.  Then the node is started and
C<CREATE EXTENSION taptalk> runs in database C<postgres> (unless
C<< extension => 0 >>); with C<< helpers => 1 >>, create_helpers() runs too.
Returns the started node; with C<< start => 0 >>, the node initialized and
configured but not started (for pg_upgrade), without the extension.

C<< install_path => $dir >> runs the PostgreSQL installed in C<$dir> (with
bin/ and lib/, as PostgreSQL::Test::Cluster's option of that name) instead
of the one under test, for another major version; C<< initdb => [...] >>
adds initdb arguments.

With C<TAPTALK_VALGRIND=DIR> in the environment (scripts/valgrind), the
server runs under valgrind memcheck, one log per process in DIR: see
valgrind_install().

=cut

sub node
{
	my ($name, %opts) = @_;
	my $mock    = $opts{mock};
	my $preload = $opts{preload} // 1;

	my $install =
	  $opts{install_path} // ($ENV{TAPTALK_VALGRIND} ? valgrind_install() : undef);

	my $node = PostgreSQL::Test::Cluster->new($name,
		defined $install ? (install_path => $install) : ());
	$node->init(
		extra => [
			'--username=postgres', '--encoding=UTF8', '--locale=C.UTF-8',
			@{ $opts{initdb} // [] }
		]);

	my @conf = ('', '# taptalk', 'max_connections = 60');
	push @conf, "shared_preload_libraries = 'taptalk'" if $preload;
	if ($mock)
	{
		push @conf,
		  "taptalk.base_url = '" . $mock->base_url . "'",
		  "taptalk.server_key_id = '$KEY_ID'",
		  $opts{key_file}
		  ? "taptalk.server_key_file = '" . write_key_file($opts{key_file}) . "'"
		  : "taptalk.server_key_secret = '$KEY_SECRET'",
		  "mock.port = '" . $mock->port . "'",
		  "mock.log = '" . $mock->log_file . "'",
		  "mock.dir = '" . $mock->dir . "'";
		push @conf, "mock.port2 = '" . $mock->port2 . "'"
		  if defined $mock->port2;
		push @conf,
		  "mock.tls_port = '" . $mock->tls_port . "'",
		  "mock.tls_dir = '" . $mock->tls_dir . "'"
		  if defined $mock->tls_port;
	}
	push @conf, $opts{conf} if defined $opts{conf};
	$node->append_conf('postgresql.conf', join("\n", @conf));
	return $node unless $opts{start} // 1;
	$node->start;

	$node->safe_psql('postgres', 'CREATE EXTENSION taptalk')
	  if $opts{extension} // 1;
	create_helpers($node) if $opts{helpers};
	return $node;
}

=pod

=item TaptalkTest::write_key_file($path [, $secret [, $mode]])

Writes C<$secret> (default: the mock's test secret) and a line break to the
key file C<$path>, replacing it, with mode C<$mode> (default 0600).  Returns
C<$path>.

=cut

sub write_key_file
{
	my ($path, $secret, $mode) = @_;
	$secret //= $KEY_SECRET;
	my $tmp = "$path.tmp";
	open(my $fh, '>', $tmp) or croak "could not write $tmp: $!";
	print $fh "$secret\n";
	close($fh) or croak "could not write $tmp: $!";
	chmod($mode // 0600, $tmp) or croak "could not chmod $tmp: $!";
	rename($tmp, $path) or croak "could not rename $tmp: $!";
	return $path;
}

=pod

=item TaptalkTest::valgrind_install()

An installation directory for PostgreSQL::Test::Cluster's C<install_path>
whose bin/ holds the programs of C<pg_config --bindir> (symbolic links, which
PostgreSQL resolves, so initdb and the others find their real files), a
copy of pg_ctl (which looks for postgres next to itself) and, as postgres, a
script that runs the real postgres under valgrind memcheck: every process
of the server (each backend is a fork of the postmaster) writes
C<$ENV{TAPTALK_VALGRIND}/PID.log>, with definite leaks reported when it
exits; test/valgrind.supp hides PostgreSQL's known noise.  Made once per
test file.

=cut

my $valgrind_dir;

sub valgrind_install
{
	return $valgrind_dir if $valgrind_dir;
	my $logdir = abs_path($ENV{TAPTALK_VALGRIND})
	  or croak "TAPTALK_VALGRIND: no such directory: $ENV{TAPTALK_VALGRIND}";
	my $pg_config = $ENV{PG_CONFIG} || 'pg_config';
	my $bindir = `$pg_config --bindir`;
	chomp $bindir;
	croak "could not run $pg_config" unless $bindir;
	my $dir = abs_path(PostgreSQL::Test::Utils::tempdir('valgrind_install'));
	mkdir "$dir/bin" or croak "mkdir $dir/bin: $!";
	opendir(my $dh, $bindir) or croak "could not read $bindir: $!";
	for my $prog (grep { -f "$bindir/$_" && -x _ } readdir $dh)
	{
		next if $prog eq 'postgres';
		if ($prog eq 'pg_ctl')
		{
			File::Copy::copy("$bindir/$prog", "$dir/bin/$prog")
			  or croak "copy $prog: $!";
			chmod 0755, "$dir/bin/$prog";
		}
		else
		{
			symlink("$bindir/$prog", "$dir/bin/$prog")
			  or croak "symlink $prog: $!";
		}
	}
	closedir $dh;
	append_to_file(
		"$dir/bin/postgres", qq{#!/bin/sh
exec valgrind --quiet --tool=memcheck --trace-children=yes \\
	--leak-check=full --show-leak-kinds=definite --errors-for-leak-kinds=definite \\
	--num-callers=40 --read-var-info=no --track-origins=no \\
	--suppressions=$ROOT/test/valgrind.supp --gen-suppressions=all \\
	--log-file=$logdir/%p.log \\
	$bindir/postgres "\$@"
});
	chmod 0755, "$dir/bin/postgres";
	$valgrind_dir = $dir;
	return $dir;
}

=pod

=item TaptalkTest::create_helpers($node [, $dbname])

What the script tests share with sql/init.sql, in C<$dbname> (default
C<postgres>, where the extension must exist): the roles C<taptalk_app> (no
privileges) and C<taptalk_caller> (may execute both functions), and
C<req(xc text)>, a valid request for the xcUserID C<xc>.

=cut

sub create_helpers
{
	my ($node, $dbname) = @_;
	$node->safe_psql($dbname // 'postgres', q{
CREATE ROLE taptalk_app LOGIN;
CREATE ROLE taptalk_caller LOGIN;
GRANT EXECUTE ON FUNCTION taptalk_auth_ticket(jsonb) TO taptalk_caller;
GRANT EXECUTE ON FUNCTION taptalk_auth_tickets(jsonb[]) TO taptalk_caller;
CREATE FUNCTION req(xc text) RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
	SELECT jsonb_build_object(
		'userIPAddress', '182.253.177.234',
		'userAgent', 'AdvancedRestClient/12.1.14',
		'userPlatform', 'android',
		'userDeviceID', 'aaaa-bbbb-cccc-dddd',
		'xcUserID', xc,
		'fullName', 'Jony')
$$;
});
	return;
}

=pod

=item TaptalkTest::create_role_callbacks($node, $dbname)

After create_helpers: lets C<taptalk_app> and C<taptalk_caller> enqueue and
requeue, and gives each a callback of its own that writes
(request_id, xcUserID, current_user, whether the ticket came, error_code)
into the table C<cb_calls>: C<public.provisioned> for C<taptalk_app>,
C<cbs.provisioned_b> (in a schema of its own, executable by
C<taptalk_caller> only) for C<taptalk_caller>.  Returns
C<(\%role, \%callback)>, each keyed C<a> and C<b>.

=cut

sub create_role_callbacks
{
	my ($node, $dbname) = @_;
	my %role = (a => 'taptalk_app', b => 'taptalk_caller');
	my %callback = (
		a => 'public.provisioned(bigint, jsonb, taptalk_auth_ticket_result)',
		b => 'cbs.provisioned_b(bigint, jsonb, taptalk_auth_ticket_result)');
	my $body = q{(request_id bigint, request jsonb, result taptalk_auth_ticket_result)
RETURNS void LANGUAGE sql AS $$
	INSERT INTO public.cb_calls
	VALUES (request_id, request->>'xcUserID', current_user,
			(result).ticket = 'ticket-' || (request->>'xcUserID'), (result).error_code)
$$;};
	$node->safe_psql($dbname, qq{
GRANT EXECUTE ON FUNCTION taptalk_enqueue(jsonb, regprocedure) TO taptalk_app, taptalk_caller;
GRANT EXECUTE ON FUNCTION taptalk_requeue(bigint[]) TO taptalk_app, taptalk_caller;
CREATE TABLE cb_calls (request_id bigint, xc text, who name, ticket_seen boolean, error_code text);
GRANT INSERT ON cb_calls TO taptalk_app, taptalk_caller;
CREATE FUNCTION public.provisioned$body
CREATE SCHEMA cbs;
GRANT USAGE ON SCHEMA cbs TO taptalk_caller;
CREATE FUNCTION cbs.provisioned_b$body
REVOKE EXECUTE ON FUNCTION $callback{b} FROM PUBLIC;
GRANT EXECUTE ON FUNCTION $callback{b} TO taptalk_caller;
});
	return (\%role, \%callback);
}

=pod

=item TaptalkTest::app_with_role_callbacks($node)

Creates the database C<app> with taptalk, the helpers and
create_role_callbacks' two roles and callbacks; returns the same two hash
references.

=cut

sub app_with_role_callbacks
{
	my ($node) = @_;
	$node->safe_psql('postgres', 'CREATE DATABASE app');
	$node->safe_psql('app', 'CREATE EXTENSION taptalk');
	create_helpers($node, 'app');
	return create_role_callbacks($node, 'app');
}

=pod

=item TaptalkTest::enqueue_as($node, $role, $callback, $prefix, $n [, $invalid, $ids])

As $role, in the database C<app>, enqueues the requests $prefix-1 ..
$prefix-$n with $callback ($invalid: without fullName); returns how many,
or with $ids their ids, comma-separated.

=cut

sub enqueue_as
{
	my ($node, $role, $callback, $prefix, $n, $invalid, $ids) = @_;
	my $req = "req('$prefix-' || i)" . ($invalid ? " - 'fullName'" : '');
	my $agg = $ids ? "string_agg(id::text, ',')" : 'count(id)';
	return $node->safe_psql('app',
		"SELECT $agg FROM (SELECT taptalk_enqueue($req, '$callback') AS id"
		  . " FROM generate_series(1, $n) i) e",
		extra_params => [ '-U', $role ]);
}

=pod

=item TaptalkTest::create_memory_functions($node [, $dbname])

Creates C<backend_memory()>, this backend's VmRSS, VmHWM (peak) and RssAnon
in kB (columns C<rss_kb>, C<hwm_kb>, C<anon_kb>) read from
/proc/self/status, and C<backend_memory_reset_peak()>, which sets VmHWM
back to VmRSS through /proc/self/clear_refs (superuser only).

=cut

sub create_memory_functions
{
	my ($node, $dbname) = @_;
	$node->safe_psql($dbname // 'postgres', q{
CREATE OR REPLACE FUNCTION backend_memory(OUT rss_kb bigint, OUT hwm_kb bigint, OUT anon_kb bigint)
LANGUAGE sql VOLATILE AS $$
	SELECT (regexp_match(s, 'VmRSS:\s+(\d+)'))[1]::bigint,
		   (regexp_match(s, 'VmHWM:\s+(\d+)'))[1]::bigint,
		   (regexp_match(s, 'RssAnon:\s+(\d+)'))[1]::bigint
	FROM pg_read_file('/proc/self/status') AS s
$$;
CREATE OR REPLACE FUNCTION backend_memory_reset_peak() RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
	EXECUTE $c$COPY (SELECT 5) TO '/proc/self/clear_refs'$c$;
END $$;
});
	return;
}

=pod

=item TaptalkTest::run_regress($node, [\%opts,] @tests)

Runs pg_regress (C<$ENV{PG_REGRESS}>) for sql/I<test>.sql of the
repository against C<$node> (C<--use-existing>, the node's host and port and
bindir), in a database created afresh (C<< dbname => >>, default
C<contrib_regression>; pass C<< fresh => 0 >> to keep an existing one).
Results go to tmp_check/regress_I<node>.  One ok() for the run; on failure
regression.diffs is printed.  Returns true when every test passed.

=cut

sub run_regress
{
	my ($node, @tests) = @_;
	my %opts = ref $tests[0] eq 'HASH' ? %{ shift @tests } : ();
	my $dbname = $opts{dbname} // 'contrib_regression';
	croak 'run_regress: no tests given' unless @tests;

	if ($opts{fresh} // 1)
	{
		$node->safe_psql('postgres', qq{DROP DATABASE IF EXISTS "$dbname"});
		$node->safe_psql('postgres', qq{CREATE DATABASE "$dbname"});
	}
	my $outdir =
	  abs_path($PostgreSQL::Test::Utils::tmp_check) . '/regress_' . $node->name;
	make_path($outdir);
	unlink "$outdir/regression.diffs", "$outdir/regression.out";

	my @cmd = (
		$ENV{PG_REGRESS},
		'--bindir=' . $node->config_data('--bindir'),
		"--inputdir=$ROOT",
		"--outputdir=$outdir",
		'--use-existing',
		'--host=' . $node->host,
		'--port=' . $node->port,
		"--dbname=$dbname",
		@tests);
	note join(' ', @cmd);
	my ($stdout, $stderr) = ('', '');
	my $ok = IPC::Run::run(\@cmd, '>', \$stdout, '2>', \$stderr);
	note $stdout;
	ok($ok, "pg_regress: @tests")
	  or diag(
		$stdout, $stderr,
		-f "$outdir/regression.diffs"
		? slurp_file("$outdir/regression.diffs")
		: "(no $outdir/regression.diffs)");
	return $ok;
}

=pod

=item TaptalkTest::psql_out_err($node, $sql, %params)

Runs C<$sql> with C<< $node->psql >> in database C<postgres> (or
C<< dbname => >>), other C<%params> passed on (C<on_error_stop> defaults to
0 here), and returns its standard output and its standard error, the
latter without psql's C<< psql:<stdin>:N: >> prefixes, so that an error
reads as a client shows it (C<ERROR:  ...>, C<HINT:  ...>).

=cut

sub psql_out_err
{
	my ($node, $sql, %params) = @_;
	my $dbname = delete $params{dbname} // 'postgres';
	my ($out, $err) = ('', '');
	$node->psql($dbname, $sql,
		on_error_stop => 0,
		%params,
		stdout => \$out,
		stderr => \$err);
	$err =~ s/^psql:<stdin>:\d+: //mg;
	return ($out, $err);
}

=pod

=item TaptalkTest::no_crash($node, $offset, $name)

ok() when the server log after byte C<$offset> shows no backend that died
(signal, exception, non-zero exit), no PANIC, no failed assertion and no
restart; otherwise the lines found are printed.

=cut

sub no_crash
{
	my ($node, $offset, $name) = @_;
	my $log = slurp_file($node->logfile, $offset);
	my @found = grep {
		/terminated by signal|terminated by exception|exited with exit code|all server processes terminated|PANIC:|TRAP:|server process .* was terminated/
	} split /\n/, $log;
	ok(!@found, "$name: no backend crashed")
	  or diag(join("\n", @found[ 0 .. ($#found < 4 ? $#found : 4) ]));
	return !@found;
}

=pod

=item TaptalkTest::log_offset($node)

The current size of the node's log file (an offset for log_contains,
slurp_file and no_crash).

=cut

sub log_offset
{
	my ($node) = @_;
	return -s $node->logfile // 0;
}

=pod

=item TaptalkTest::silent_server()

A listening socket on 127.0.0.1 (port chosen by the system) that never
accepts: the kernel completes connections, nobody reads or answers, so a
request to it waits until it is stopped.  Keep the returned object for as
long as the server is needed; C<< ->sockport >> is its port.

=cut

sub silent_server
{
	require IO::Socket::INET;
	my $socket = IO::Socket::INET->new(
		LocalAddr => '127.0.0.1',
		LocalPort => 0,
		Listen => 512,
		ReuseAddr => 1);
	die "could not listen: $!" unless $socket;
	return $socket;
}

=pod

=item TaptalkTest::wait_log($node, $offset, $re)

Whether the node's server log after C<$offset> matches C<$re> within the
default timeout (polled every 100 ms).

=cut

sub wait_log
{
	my ($node, $offset, $re) = @_;
	for (1 .. 10 * $PostgreSQL::Test::Utils::timeout_default)
	{
		return 1 if slurp_file($node->logfile, $offset) =~ $re;
		usleep(100_000);
	}
	return 0;
}

=pod

=item TaptalkTest::silent_node($name, $base_url [, $conf])

A node whose taptalk.base_url is C<$base_url>, with a test key and no mock
settings; C<$conf> is appended to postgresql.conf.

=cut

sub silent_node
{
	my ($name, $base_url, $conf) = @_;
	return node(
		$name,
		conf => join("\n",
			"taptalk.base_url = '$base_url'",
			"taptalk.server_key_id = '$KEY_ID'",
			"taptalk.server_key_secret = '$KEY_SECRET'",
			$conf // ()));
}

=pod

=item TaptalkTest::active_pid($node, $like)

The process id of the other session whose active query is LIKE C<$like>,
waited for up to 5 s; dies if there is none.

=cut

sub active_pid
{
	my ($node, $like) = @_;
	for (1 .. 500)
	{
		my $pid = $node->safe_psql('postgres',
			"SELECT pid FROM pg_stat_activity WHERE state = 'active' "
			  . "AND query LIKE '$like' AND pid <> pg_backend_pid()");
		return $pid if $pid;
		usleep(10_000);
	}
	die "no active query like $like";
}

=item TaptalkTest::worker_pid($node [, $dbname])

The process id of the queue's background worker (C<backend_type> taptalk
worker), or the empty string when none runs.

=cut

sub worker_pid
{
	my ($node, $dbname) = @_;
	return $node->safe_psql($dbname // 'postgres',
		"SELECT pid FROM pg_stat_activity WHERE backend_type = 'taptalk worker'");
}

=item TaptalkTest::cpu_seconds($pid)

The CPU time (user and system) process $pid has used so far, in seconds,
from /proc.

=cut

sub cpu_seconds
{
	my ($pid) = @_;
	my $stat = PostgreSQL::Test::Utils::slurp_file("/proc/$pid/stat");
	$stat =~ s/^.*\) //s;	# after the command name
	my @f = split / /, $stat;
	# utime and stime, fields 14 and 15
	return ($f[11] + $f[12]) / POSIX::sysconf(POSIX::_SC_CLK_TCK());
}

=item TaptalkTest::queue_drained($node, $what [, $dbname])

A test that passes once no request of the queue of database C<$dbname>
(default postgres) is queued or being sent (poll_query_until's wait).

=cut

sub queue_drained
{
	my ($node, $what, $dbname) = @_;
	Test::More::ok(
		$node->poll_query_until($dbname // 'postgres',
			"SELECT count(*) = 0 FROM taptalk_queue WHERE state IN ('queued', 'sending')"),
		"queue drained: $what");
}

=pod

=back

=cut

package TaptalkTest::Mock;

use strict;
use warnings;

use Carp;
use Cwd qw(abs_path);
use JSON::PP;
use POSIX ();
use PostgreSQL::Test::Utils;
use Scalar::Util qw(weaken);
use Time::HiRes qw(usleep);

# running mocks by process id (weak references), for the END block
my %running;

=pod

=head1 TaptalkTest::Mock

=over

=item TaptalkTest::Mock->start(%opts)

Starts the mock on an ephemeral port of 127.0.0.1 and returns once it has
said which one.  Options: C<< second_port => 1 >> (a second plain port, the
target of the mock's redirects), C<< tls => 1 >> (an HTTPS port as well,
with certificates from a throwaway CA made here; C<< cert => 'server' >>,
the default, is valid for 127.0.0.1 and localhost, C<< cert => 'wrong' >>
for the host name wrong.example only), C<< args => [...] >> (more mock
arguments), C<< dir => $dir >> (default: a new directory under tmp_check).

=cut

sub start
{
	my ($class, %opts) = @_;
	my $dir = $opts{dir}
	  // abs_path(PostgreSQL::Test::Utils::tempdir('mock'));
	my $self = bless {
		dir         => $dir,
		log_file    => "$dir/mock.jsonl",
		tls         => $opts{tls} ? 1 : 0,
		cert        => $opts{cert} // 'server',
		second_port => $opts{second_port} ? 1 : 0,
		args        => $opts{args} // [],
	}, $class;
	chmod 0755, $dir;
	if ($self->{tls})
	{
		$self->{tls_dir} = "$dir/tls";
		make_test_certs($self->{tls_dir});
	}
	$self->_launch;
	return $self;
}

=pod

=item $mock->restart(%opts)

Stops the mock and starts it again on the same ports (so the node's
settings stay right), with C<< cert => >> to change the TLS certificate.
The mock's log starts anew: earlier marks are void.

=cut

sub restart
{
	my ($self, %opts) = @_;
	$self->stop;
	$self->{cert} = $opts{cert} if defined $opts{cert};
	$self->_launch(1);
	return $self;
}

sub _launch
{
	my ($self, $same_ports) = @_;
	my $dir = $self->{dir};
	my @ports =
	  $same_ports
	  ? @{ $self->{ports} }
	  : ((0) x (1 + $self->{second_port}));
	my @cmd = (
		$TaptalkTest::PYTHON, "$TaptalkTest::ROOT/test/mock_taptalk.py",
		'--host', '127.0.0.1', map { ('--port', $_) } @ports);
	if ($self->{tls})
	{
		my $cert = $self->{cert};
		push @cmd,
		  '--tls-port', $same_ports ? $self->{tls_port} : 0,
		  '--tls-cert', "$self->{tls_dir}/$cert.pem",
		  '--tls-key',  "$self->{tls_dir}/$cert.key";
	}
	push @cmd,
	  '--key-id', $TaptalkTest::KEY_ID, '--key-secret', $TaptalkTest::KEY_SECRET,
	  '--log', $self->{log_file}, '--exit-on-eof', @{ $self->{args} };

	# a new file for each start, so that a restart never reads the ready
	# line of the mock before
	my $out = "$dir/mock" . ($self->{starts}++ ? "-$self->{starts}" : '') . '.out';
	unlink $out;
	pipe(my $stdin_r, my $stdin_w) or die "pipe: $!";
	my $pid = fork;
	die "fork: $!" unless defined $pid;
	if ($pid == 0)
	{
		open(STDIN, '<&', $stdin_r) or POSIX::_exit(127);
		open(STDOUT, '>', $out) or POSIX::_exit(127);
		open(STDERR, '>&', \*STDOUT) or POSIX::_exit(127);
		exec(@cmd) or POSIX::_exit(127);
	}
	close $stdin_r;
	$self->{pid}   = $pid;
	$self->{stdin} = $stdin_w;
	$self->{owner} = $$;
	$running{$pid} = $self;
	weaken($running{$pid});

	my $deadline = time + $PostgreSQL::Test::Utils::timeout_default;
	my $ready;
	while (time < $deadline)
	{
		my $text = -e $out ? slurp_file($out) : '';
		if ($text =~ /^mock ready ports=(\S*)(?: tls_port=(\d+))?$/m)
		{
			$ready = [ $1, $2 ];
			last;
		}
		if (waitpid($pid, POSIX::WNOHANG()) == $pid)
		{
			delete $running{$pid};
			$self->{pid} = undef;
			croak "mock server exited at start (status $?):\n$text";
		}
		usleep(50_000);
	}
	unless ($ready)
	{
		$self->stop;
		croak "mock server did not start:\n" . slurp_file($out);
	}
	my @got = split /,/, $ready->[0];
	$self->{ports}    = \@got;
	$self->{tls_port} = $ready->[1];
	Test::More::note("mock server (pid $pid): ports @got"
		  . ($self->{tls} ? ", TLS port $ready->[1] ($self->{cert}.pem)" : ''));
	return;
}

=pod

=item $mock->stop

Stops the mock (SIGTERM, then SIGKILL after 10 s) and waits for it.  Safe to
call twice; runs on DESTROY and at exit.

=cut

sub stop
{
	my ($self) = @_;
	my $pid = $self->{pid};
	return unless $pid && $self->{owner} == $$;
	kill 'TERM', $pid;
	my $deadline = time + 10;
	while (waitpid($pid, POSIX::WNOHANG()) == 0)
	{
		if (time > $deadline)
		{
			kill 'KILL', $pid;
			waitpid($pid, 0);
			last;
		}
		usleep(20_000);
	}
	close $self->{stdin} if $self->{stdin};
	$self->{stdin} = undef;
	$self->{pid}   = undef;
	delete $running{$pid};
	return;
}

sub DESTROY
{
	my ($self) = @_;
	local ($?, $!, $@);
	$self->stop;
	return;
}

END
{
	local $?;
	$_->stop for grep { defined } values %running;
}

=pod

=item Accessors

C<port>, C<port2> (undef without C<second_port>), C<tls_port> (undef
without C<tls>), C<base_url> (C<http://127.0.0.1:PORT>), C<tls_dir> (with
C<ca.pem>, C<other-ca.pem>, C<server.pem>, C<wrong.pem>), C<dir>,
C<log_file>, C<pid>.

=cut

sub port     { return $_[0]->{ports}[0]; }
sub port2    { return $_[0]->{ports}[1]; }
sub tls_port { return $_[0]->{tls_port}; }
sub base_url { return 'http://127.0.0.1:' . $_[0]->port; }
sub tls_url  { return 'https://127.0.0.1:' . $_[0]->tls_port; }
sub tls_dir  { return $_[0]->{tls_dir}; }
sub dir      { return $_[0]->{dir}; }
sub log_file { return $_[0]->{log_file}; }
sub pid      { return $_[0]->{pid}; }

=pod

=item $mock->log_mark

The current end of the mock's log (a byte offset) for log_entries and count.

=item $mock->log_entries([$mark])

The log's lines after C<$mark> (default: all), decoded from JSON: hashes with
C<event> (C<connection> or C<request>), C<port>, C<conn>, and for requests
C<seq>, C<method>, C<path>, C<headers> ([[name, value], ...]), C<body>,
C<body_b64>, C<body_is_json>.  (JSON::PP is slow on megabyte bodies: for
large logs use count or scan_log.)

=item $mock->scan_log($mark, sub { my ($line) = @_; ... })

Calls the function for each line logged after C<$mark>, undecoded (one
compact JSON object, ASCII only, as the mock writes it), reading the file a
line at a time.

=item $mock->count($mark, $event [, $port [, $pattern]])

How many C<$event> lines were logged after C<$mark>, on C<$port> when given
(undef: any port), and, when C<$pattern> (a regex) is given, whose line
matches it (the line as logged: JSON, the body an escaped string; use
patterns without quotes or backslashes, such as an xcUserID).

=item $mock->server_key_secrets([$mark])

The secrets of the Server-Key headers of the requests logged after
C<$mark>, in order: each header decoded from base64, with the key ID and
its colon removed.

=back

=cut

sub server_key_secrets
{
	my ($self, $mark) = @_;
	require MIME::Base64;
	my @secrets;
	for my $e ($self->log_entries($mark))
	{
		next unless $e->{event} eq 'request';
		for my $h (@{ $e->{headers} })
		{
			next unless lc($h->[0]) eq 'server-key';
			my $pair = MIME::Base64::decode_base64($h->[1]);
			$pair =~ s/^[^:]*://;
			push @secrets, $pair;
		}
	}
	return @secrets;
}

sub log_mark
{
	my ($self) = @_;
	return -s $self->{log_file} // 0;
}

sub scan_log
{
	my ($self, $mark, $callback) = @_;
	open(my $fh, '<', $self->{log_file})
	  or croak "could not open $self->{log_file}: $!";
	seek($fh, $mark // 0, 0) or croak "could not seek: $!";
	while (my $line = <$fh>)
	{
		chomp $line;
		$callback->($line) if $line ne '';
	}
	close $fh;
	return;
}

sub log_entries
{
	my ($self, $mark) = @_;
	my $json = JSON::PP->new->max_depth(1_000_000);
	my @entries;
	$self->scan_log($mark, sub { push @entries, $json->decode($_[0]) });
	return @entries;
}

sub count
{
	my ($self, $mark, $event, $port, $pattern) = @_;
	my $n = 0;
	$self->scan_log(
		$mark,
		sub {
			my ($line) = @_;
			# the mock writes "event" and "port" first
			$line =~ /^\{"event":"(\w+)","port":(\d+),/
			  or croak "unexpected line in the mock's log: " . substr($line, 0, 200);
			$n++
			  if $1 eq $event
			  && (!defined $port || $2 == $port)
			  && (!defined $pattern || $line =~ $pattern);
		});
	return $n;
}

=pod

=head2 TaptalkTest::Mock::make_test_certs($dir)

A throwaway CA (ca.pem) and, signed by it, server.pem for 127.0.0.1 and
localhost and wrong.pem for the host name wrong.example (keys NAME.key);
other-ca.pem is a second CA that signed neither.

=cut

sub make_test_certs
{
	my ($dir) = @_;
	mkdir $dir or die "mkdir $dir: $!" unless -d $dir;
	chmod 0755, $dir;
	my $run = sub {
		my ($out, $err) = ('', '');
		IPC::Run::run([ 'openssl', @_ ], '>', \$out, '2>', \$err)
		  or die "openssl @_ failed: $err";
	};
	my @ec = ('-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1',
		'-nodes');
	for my $ca ('ca', 'other-ca')
	{
		$run->(
			'req', '-x509', '-new', @ec,
			'-keyout', "$dir/$ca.key",
			'-out', "$dir/$ca.pem",
			'-days', '2', '-subj', "/CN=taptalk test $ca",
			'-addext', 'basicConstraints=critical,CA:TRUE',
			'-addext', 'keyUsage=critical,keyCertSign,cRLSign');
	}
	for my $leaf ([ 'server', '127.0.0.1', 'DNS:localhost,IP:127.0.0.1' ],
		[ 'wrong', 'wrong.example', 'DNS:wrong.example' ])
	{
		my ($name, $cn, $san) = @$leaf;
		$run->(
			'req', '-new', @ec,
			'-keyout', "$dir/$name.key",
			'-out', "$dir/$name.csr",
			'-subj', "/CN=$cn");
		append_to_file("$dir/$name.ext",
			    "basicConstraints=critical,CA:FALSE\n"
			  . "keyUsage=critical,digitalSignature\n"
			  . "extendedKeyUsage=serverAuth\n"
			  . "subjectAltName=$san\n");
		$run->(
			'x509', '-req', '-in', "$dir/$name.csr",
			'-CA', "$dir/ca.pem", '-CAkey', "$dir/ca.key",
			'-CAcreateserial', '-days', '2',
			'-extfile', "$dir/$name.ext",
			'-out', "$dir/$name.pem");
		unlink "$dir/$name.csr", "$dir/$name.ext";
	}
	chmod 0600, glob("$dir/*.key");
	chmod 0644, glob("$dir/*.pem");
	return;
}

1;
